"""The published numbers the report prints beside ours (%, WideResNet-50, 224x224 unless said otherwise).

PatchCore paper Tables 1, 2, S1-S4, its Table 5 inference times, and the SPADE paper's Table 6 (PRO per pyramid
level), parsed once into `PAPER[metric][method][category or "mean" / "total"]`. Nothing else lives here.
"""

from __future__ import annotations

__all__ = ["PAPER", "PAPER_CATEGORIES"]

PAPER_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
)
# Rows: method, then mean and the 15 categories in the order above (the paper's column order).
_TABLES = {
    "image_auroc": """
PatchCore-25% 99.1 100 99.5 98.1 98.7 98.2 100 100 100 96.6 98.1 98.7 100 100 99.2 99.4
PatchCore-10% 99.0 100 99.4 97.8 98.7 97.9 100 100 100 96.0 97.0 98.9 99.7 100 99.0 99.5
PatchCore-1% 99.0 100 99.3 98.0 98.0 98.6 100 100 99.7 97.0 96.4 99.4 100 99.9 99.2 99.2
""",
    "pixel_auroc": """
SPADE 96.0 98.4 97.2 99.0 97.5 93.7 99.1 97.6 98.1 96.5 98.9 87.4 97.9 94.1 88.5 96.5
PaDiM 97.5 98.3 96.7 98.5 99.1 97.3 98.2 99.2 97.2 95.7 98.5 94.1 98.8 98.5 94.9 98.5
PatchCore-25% 98.1 98.6 98.4 98.8 99.0 98.7 98.7 99.3 98.4 97.4 99.4 95.6 98.7 96.3 95.0 98.8
PatchCore-10% 98.1 98.6 98.5 98.9 99.1 98.7 98.7 99.3 98.4 97.6 99.4 95.9 98.7 96.4 95.1 98.9
PatchCore-1% 98.0 98.5 98.2 98.8 98.9 98.6 98.6 99.3 98.4 97.1 99.2 96.1 98.5 94.9 95.1 98.8
""",
    "au_pro": """
SPADE 91.7 95.5 90.9 93.7 94.7 86.7 95.4 97.2 94.4 94.6 96.0 75.6 93.5 87.4 87.4 92.6
PaDiM 92.1 94.8 88.8 93.5 96.2 94.6 92.6 97.8 85.6 92.7 94.4 86.0 93.1 84.5 91.1 95.9
PatchCore-25% 93.4 96.2 92.5 95.5 96.6 96.0 93.8 98.9 91.4 93.2 97.9 87.3 91.5 83.7 89.4 97.1
PatchCore-10% 93.5 96.1 92.6 95.5 96.6 95.9 93.9 98.9 91.3 94.1 97.9 87.4 91.4 83.5 89.6 97.1
PatchCore-1% 93.1 95.9 91.6 95.5 96.5 96.1 93.8 98.9 91.2 92.9 97.1 88.3 90.2 81.2 89.5 97.0
""",
    # Table S4: PatchCore-1%, WideResNet-101, image size 280, hierarchies (2, 3) and (1, 2, 3).
    "s4": """
(2,3)/image_auroc 99.4 100 99.6 98.2 98.4 99.8 100 100 100 97.2 98.9 98.9 100 100 99.5 99.9
(2,3)/pixel_auroc 98.2 98.6 98.4 99.1 98.7 98.7 98.8 99.3 98.8 97.8 99.3 96.1 98.8 96.4 95.1 98.9
(2,3)/au_pro 94.4 96.6 93.8 96.0 97.4 96.8 91.2 99.1 94.8 94.0 97.5 89.5 95.5 84.8 91.7 97.8
(1,2,3)/image_auroc 99.2 100 99.7 98.1 98.2 98.3 100 100 100 97.1 99.0 98.9 98.9 99.7 99.9 99.7
(1,2,3)/pixel_auroc 98.4 98.6 98.7 99.1 98.7 98.8 98.8 99.3 99.0 98.6 99.5 96.3 98.9 97.1 95.2 99.0
(1,2,3)/au_pro 95.0 96.6 94.6 96.3 97.5 97.0 91.5 99.1 95.4 96.0 98.1 90.0 95.8 85.9 92.0 98.0
""",
}
# SPADE paper Table 6 (PRO %): one pyramid level (its grid at 224: 14 = level 3, 28 = level 2, 56 = level 1)
# vs all three. Its rows are in a different category order, so they are given by name.
_SPADE_T6 = {
    "carpet": (93.5, 93.4, 91.0, 94.7), "grid": (80.9, 88.0, 89.1, 86.7), "leather": (96.6, 97.5, 97.3, 97.2),
    "tile": (74.5, 65.9, 73.8, 75.9), "wood": (84.7, 87.7, 87.5, 87.4), "bottle": (93.7, 94.7, 88.3, 95.5),
    "cable": (89.3, 87.3, 73.5, 90.9), "capsule": (90.5, 92.8, 91.4, 93.7), "hazelnut": (92.7, 95.8, 96.2, 95.4),
    "metal_nut": (91.3, 93.1, 86.1, 94.4), "pill": (89.2, 94.4, 96.3, 94.6), "screw": (90.7, 95.9, 96.1, 96.0),
    "toothbrush": (90.9, 93.5, 94.5, 93.5), "transistor": (91.3, 72.1, 62.5, 87.4),
    "zipper": (90.9, 92.4, 92.5, 92.6), "mean": (89.38, 89.6, 87.74, 91.7),
}


def _parse_paper() -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for metric, text in _TABLES.items():
        for line in text.strip().splitlines():
            name, *values = line.split()
            cols = ("mean", *PAPER_CATEGORIES)
            if metric == "s4":
                hier, sub = name.split("/")
                out.setdefault(f"s4{hier}", {}).setdefault(sub, {}).update(zip(cols, map(float, values), strict=True))
            else:
                out.setdefault(metric, {})[name] = dict(zip(cols, map(float, values), strict=True))
    out["image_auroc"]["SPADE"] = {"mean": 85.5}
    out["image_auroc"]["PaDiM"] = {"mean": 95.3}
    # Table 1: misclassified images at the F1-optimal threshold, summed over all 15 categories.
    out["misclassified"] = {"PatchCore-25%": {"total": 42}, "PatchCore-10%": {"total": 47},
                            "PatchCore-1%": {"total": 49}}
    levels = {"(3,)": 0, "(2,)": 1, "(1,)": 2, "(1,2,3)": 3}
    out["spade_pro"] = {lv: {cat: vals[i] for cat, vals in _SPADE_T6.items()} for lv, i in levels.items()}
    # Paper Table 5 (GPU, WRN-50, backbone included), seconds per image.
    out["seconds_per_image"] = {"PatchCore-100%": {"gpu": 0.60}, "PatchCore-10%": {"gpu": 0.22},
                                "PatchCore-1%": {"gpu": 0.17}}
    return out


PAPER = _parse_paper()
