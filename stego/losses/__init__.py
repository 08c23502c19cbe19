"""Training objectives: pure tensor functions (shapes in their docstrings) and the modules that
combine them.

- :mod:`stego.losses.sampling`: where the STEGO loss looks (coordinates, bilinear reads,
  derangements).
- :mod:`stego.losses.stego`: STEGO's correlation-distillation loss (:class:`StegoLoss`).
- :mod:`stego.losses.cause`: CAUSE's concept modularity and concept-wise contrastive losses.
"""

from stego.losses.cause import (
    ConceptBank,
    centroid_assign,
    concept_contrastive_loss,
    grid_subsample,
    modularity_loss,
    nearest_concept,
)
from stego.losses.sampling import (
    DERANGEMENT_MODES,
    bilinear_rows,
    channels_last_table,
    derangement,
    read_rows,
    sample_at,
    sample_coords,
    sample_points,
)
from stego.losses.stego import (
    SHIFT_KEYS,
    TERMS,
    CorrelationParts,
    StegoLoss,
    StegoLossOutput,
    TermStats,
    code_correlation,
    correlation,
    correlation_parts,
    correlation_term,
    feature_correlation,
    normalize,
)

__all__ = [
    "DERANGEMENT_MODES",
    "SHIFT_KEYS",
    "TERMS",
    "ConceptBank",
    "CorrelationParts",
    "StegoLoss",
    "StegoLossOutput",
    "TermStats",
    "bilinear_rows",
    "centroid_assign",
    "channels_last_table",
    "code_correlation",
    "concept_contrastive_loss",
    "correlation",
    "correlation_parts",
    "correlation_term",
    "derangement",
    "feature_correlation",
    "grid_subsample",
    "modularity_loss",
    "nearest_concept",
    "normalize",
    "read_rows",
    "sample_at",
    "sample_coords",
    "sample_points",
]
