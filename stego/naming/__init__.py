"""From clusters to the classes a user wants: name a model's clusters, from a few labelled
images or by hand, and rewrite a ``stego segment`` output with class ids.

- :mod:`stego.naming.names`: class names from ``classes.txt`` and from ``--names``;
- :mod:`stego.naming.labels`: LABELS folders, majority naming;
- :mod:`stego.naming.render`: the atomic re-render of RESULTS;
- :mod:`stego.naming.results`: :func:`name_results`, the whole job.

The class map itself (:class:`ClassMap`, ``classes.json``) lives in
:mod:`stego.models.class_map`, so that a model carries it without importing this package.
"""

from __future__ import annotations

from stego.models.class_map import ClassMap, read_class_map, write_class_map
from stego.naming.labels import majority_class_map
from stego.naming.names import hand_class_map, parse_names, read_classes_txt
from stego.naming.results import name_results, read_results

__all__ = [
    "ClassMap",
    "read_class_map",
    "write_class_map",
    "parse_names",
    "read_classes_txt",
    "hand_class_map",
    "majority_class_map",
    "name_results",
    "read_results",
]
