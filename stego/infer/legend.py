"""The legend of written label maps: id -> colour (and class name when known)."""

from __future__ import annotations

from typing import Any

from stego.viz import default_palette

__all__ = ["legend"]


def legend(model: Any, probe: str = "cluster") -> list[dict[str, Any]]:
    """Legend of the written ids: ``[{"id", "color": [r, g, b], "class_name"?}]``.

    Named clusters (``probe="class"``) use the names and colours of the model's class map.
    Class ids (linear probe) use the model's class names and palette. Cluster ids use the
    palette of their matched class when ``meta.extra["assignment"]`` (cluster -> class, as
    found by Hungarian matching at evaluation) is known, else distinct default colours.
    """
    if probe == "class":
        classes = model.classes
        return [
            {"id": k, "color": list(color), "class_name": name}
            for k, (name, color) in enumerate(zip(classes.names, classes.colors, strict=True))
        ]
    meta = model.meta
    names = list(meta.class_names or [])
    palette = [list(map(int, c)) for c in (meta.palette or [])]
    n = int(meta.n_classes or 0) if probe == "linear" else int(meta.n_clusters)
    fallback = default_palette(n).tolist()
    assignment = meta.extra.get("assignment") if probe == "cluster" else list(range(n))
    entries = []
    for k in range(n):
        entry: dict[str, Any] = {"id": k, "color": fallback[k]}
        cls = assignment[k] if assignment is not None and k < len(assignment) else None
        if cls is not None and 0 <= cls < len(palette):
            entry["color"] = palette[cls]
        if cls is not None and 0 <= cls < len(names):
            entry["class_name"] = names[cls]
        entries.append(entry)
    return entries
