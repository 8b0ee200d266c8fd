"""Which windows a position bias was trained at: recorded (`reference_windows`), or read back from a state dict's
`relative_coords_table` (`implied_windows`, `spacing`), and the warning when a model normalises its coordinates by
other windows than its weights were trained at (`check_windows`)."""

from __future__ import annotations

import re
import warnings
from typing import Any, Mapping, Optional, Tuple

from swinv2.convert import StateDict
from swinv2.model import SwinTransformerV2

Windows = Tuple[Tuple[int, int], ...]


def reference_windows(arch: Mapping[str, Any]) -> Windows:
    """Per stage, the window the position-bias coordinates are normalised by: the pretraining window where one is
    set, else the stage's own window (as `swinv2.attention.relative_coords_table` does)."""
    pretrained = arch.get("pretrained_window_sizes") or [[0, 0]] * len(arch["window_size"])
    return tuple(
        (int(p[0]), int(p[1])) if p[0] > 0 else (int(w[0]), int(w[1])) for w, p in zip(arch["window_size"], pretrained)
    )


def _implied_side(w: int, top: float, log_spaced: bool) -> int:
    """The reference window R that puts the largest offset w - 1 at the stored coordinate `top`."""
    t = 2 ** (3 * top) - 1 if log_spaced else top  # log-CPB stores log2(8 (w-1)/(R-1) + 1) / log2(8)
    if w <= 1 or t <= 0:
        return w
    return round((8 if log_spaced else 1) * (w - 1) / t + 1)


def implied_windows(sd: StateDict, log_spaced: bool = True) -> Optional[Windows]:
    """Per stage, the window a (prefix-free, official-layout) state dict's `relative_coords_table` was made for,
    read from its largest coordinate; None if a stage has no table (timm files, Swin V1 bias tables)."""
    stages = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.blocks\.", k))}
    windows = []
    for i in sorted(stages):
        table = sd.get(f"layers.{i}.blocks.0.attn.relative_coords_table")  # (1, 2Wh-1, 2Ww-1, 2)
        if table is None:
            return None
        sides = ((table.shape[1] + 1) // 2, (table.shape[2] + 1) // 2)
        windows.append(tuple(_implied_side(sides[a], float(table[0, -1, -1, a]), log_spaced) for a in range(2)))
    return tuple(windows) if windows else None


def spacing(sd: StateDict) -> Optional[str]:
    """ "log_cpb" or "linear_cpb", read from stage 0's `relative_coords_table` (linear coordinates double from
    offset 1 to offset 2, log-spaced ones do not); None without a table or with a window under 3."""
    table = sd.get("layers.0.blocks.0.attn.relative_coords_table")  # (1, 2Wh-1, 2Ww-1, 2)
    if table is None or table.shape[1] < 5:
        return None
    centre = (table.shape[1] - 1) // 2
    one, two = float(table[0, centre + 1, 0, 0]), float(table[0, centre + 2, 0, 0])
    return "linear_cpb" if abs(two - 2 * one) < 1e-5 * max(1.0, abs(two)) else "log_cpb"


def _same_coordinates(arch: Mapping[str, Any], file_windows: Windows) -> bool:
    """Whether the model's coordinates equal those the file was trained with: per stage and axis the divisor is
    `max(R - 1, 1)` (so R = 1 and R = 2 agree), and an axis whose window is 1 has only the offset 0."""
    for w, ours, theirs in zip(arch["window_size"], reference_windows(arch), file_windows):
        for a in range(2):
            if w[a] > 1 and max(ours[a] - 1, 1) != max(theirs[a] - 1, 1):
                return False
    return len(file_windows) == len(arch["window_size"])


def check_windows(model: SwinTransformerV2, file_windows: Optional[Windows], how: str, name: str) -> None:
    """Warn when `model` normalises its position coordinates by other windows than those the file's position bias
    was trained at (`how`: where those came from)."""
    arch = model.architecture()
    if file_windows is None or arch["position_bias"] == "table":
        return
    model_windows = reference_windows(arch)
    if not _same_coordinates(arch, file_windows):
        warnings.warn(
            f"{name}: its position bias was trained at windows {list(file_windows)} ({how}), but the model "
            f"normalises its position coordinates by {list(model_windows)} (pretrained_window_sizes="
            f"{arch['pretrained_window_sizes']}, windows {arch['window_size']}): the weights will not mean what they "
            f"were trained to. Build the model with pretrained_window_sizes={[list(w) for w in file_windows]} "
            "(--model.pretrained_window_sizes in the fine-tuning stage).",
            stacklevel=3,
        )
