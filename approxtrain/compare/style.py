"""How the compare figures look: one fixed colour per sampler, sizes and fonts for a paper.

Colours are fixed per sampler name, never by the order runs are found, so ``topk``
has the same colour in every report: exact (the baseline) is black, and the sampler
policies of :data:`approxtrain.sampling.POLICIES` take the Tableau-10 colours in that
tuple's order (a policy added at its end gets the next free colour; the others keep
theirs). A sampler name outside it (an old W&B run) gets one of the remaining colours,
picked by a checksum of its name. Grey is left for the Pareto front.

Figures are 6.75 in wide (a two-column paper's full text width; they scale down to
one column), with 9-10 pt text at that size, and PNGs at 200 dpi. PDF and SVG keep
their text as text (TrueType in PDF), so it can be edited and searched.
"""

from __future__ import annotations

import zlib
from typing import Any

from matplotlib import colormaps

from approxtrain.compare.matching import EXACT_SAMPLER
from approxtrain.sampling import POLICIES

EXACT_COLOR = "#000000"
_TABLEAU = [colormaps["tab10"](i) for i in range(10)]
_GREY = 7  # Tableau-10's grey: the Pareto front's
PARETO_COLOR = _TABLEAU[_GREY]
_FREE = [color for i, color in enumerate(_TABLEAU) if i != _GREY]
_POLICY_COLORS = dict(zip((p for p in POLICIES if p != EXACT_SAMPLER), _FREE))
_SPARE = _FREE[len(_POLICY_COLORS):]  # for sampler names outside POLICIES

FIGURE_WIDTH_IN = 6.75
PANEL_HEIGHT_IN = 3.9
PNG_DPI = 200
BAND_ALPHA = 0.18  # the +-1 std band of a curve or a baseline
RC_PARAMS: dict[str, Any] = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 8.5,
    "lines.linewidth": 1.6,
    "pdf.fonttype": 42,  # TrueType: text stays text in the PDF
    "svg.fonttype": "none",
}
ANNOTATION_SIZE = 8.5


def sampler_color(sampler: str) -> Any:
    """The fixed colour of a sampler (an RGBA tuple or hex string); see the module docstring."""
    if sampler == EXACT_SAMPLER:
        return EXACT_COLOR
    if sampler in _POLICY_COLORS:
        return _POLICY_COLORS[sampler]
    return _SPARE[zlib.crc32(sampler.encode()) % len(_SPARE)]
