"""What to checkpoint, as one value, from every way of writing it.

`parse` reads every spelling memfit takes, in the library, the CLI, the YAML
recipes, the trainers' callbacks and attribution alike, into a `Schedule`:

* a strategy string: `none`, `blocks`, `every:K`, `segments:N`, `sqrt`,
  `selective`, `scores`, `pointwise`, `offload` (see `memfit.core.strategies`);
* `true` / `false` (bools, or YAML's `on`, `off`, `yes`, `no`, `1`, `0`):
  `blocks` / `none`;
* `plan:BUDGET` or `budget:BUDGET` (`60%`, `8GiB`, `auto`): plan for that
  budget, once there is a batch to plan with;
* `plan:FILE.json`, or a `Plan`: a plan made before;
* `{chain: any of the strategies above}`: one per chain, the others plain;
* a list of `strategies.Unit`.

A `Budget` is parsed once too, and resolved to bytes where the plain step's
peak and the device are known (`auto`: that device's free memory).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import torch

from memfit.core import strategies
from memfit.core.memory import available_bytes, fmt_bytes
from memfit.core.strategies import Mode, Unit
from memfit.errors import MemfitError

__all__ = ["parse", "Schedule", "Budget", "Plan", "BlockChoice"]

OFF = {"false", "off", "no", "0"}
ON = {"true", "on", "yes", "1"}
SPELLINGS = (
    "a strategy such as blocks or selective, true or false, plan:60% (or budget:60%), plan:FILE.json, "
    "or one of these per chain as {chain: strategy}"
)
BUDGET_HELP = "a size like 20GiB or 800MB, a percentage of the plain run's peak like 60%, or auto"
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(-?\s*(?:\d+(?:\.\d*)?|\.\d+))\s*([a-z]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A memory budget: `size` bytes, `fraction` of the plain step's peak, or
    (neither) `auto`, the free memory of the device used less 10%."""

    text: str
    size: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, budget) -> Budget:
        """From bytes (an int), '20GiB', '800MB', '60%' or 'auto'; a Budget is returned as it is."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            if budget > 0:
                return cls(str(budget), size=int(budget))
            raise MemfitError(f"budget {budget} must be positive; give {BUDGET_HELP}.")
        text = str(budget).strip()
        if text.lower() == "auto":
            return cls("auto")
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                pct = float("nan")
            if not 0 < pct <= 100:
                raise MemfitError(
                    f"budget {text} must be a percentage above 0% and at most 100% of the plain "
                    f"run's peak; give {BUDGET_HELP}."
                )
            return cls(text, fraction=pct / 100)
        m = _SIZE.match(text)
        if not m or m.group(2).lower() not in _UNITS:
            raise MemfitError(f"cannot read budget {text!r}; give {BUDGET_HELP}.")
        value = float(m.group(1).replace(" ", "")) * _UNITS[m.group(2).lower()]
        if value <= 0:
            raise MemfitError(f"budget {text} must be positive; give {BUDGET_HELP}.")
        return cls(text, size=int(value))

    def bytes(self, baseline_peak: int | None = None, device="cpu") -> int:
        """Bytes: a percentage of `baseline_peak`, or for auto the free memory of `device`."""
        if self.size is not None:
            return self.size
        if self.fraction is not None:
            if baseline_peak is None:
                raise MemfitError(
                    f"budget {self.text} is a share of the plain run's peak, which is not known "
                    f"here; give a size like 20GiB instead."
                )
            return int(baseline_peak * self.fraction)
        return available_bytes(torch.device(device))


@dataclass
class BlockChoice:
    name: str
    mode: Mode  # keep, pointwise, scores, selective, recompute, offload or ops:... (op-level)
    segment: list | None  # [first, last] block names of its segment, if recomputed with others
    kept_bytes: int  # what it keeps through the forward
    cost: float  # its share of the plan's overhead (fraction of a plain step)

    def __post_init__(self):
        self.mode = Mode.parse(self.mode)  # a plan read from JSON names its modes in their printed form


@dataclass
class Plan:
    """Per block, the strategy chosen, the bytes it keeps and what it costs;
    for the step, the predicted peak and overhead. Data: `to_json` /
    `from_json`, and `memfit.apply(model, plan)` on any model of the same shape."""

    blocks: list[BlockChoice]
    budget_bytes: int
    predicted_peak_bytes: int
    baseline_peak_bytes: int
    predicted_overhead: float  # recomputation cost as a fraction of a plain step's
    cost: str  # "time" or "flops"
    predicted_recompute_flops: float  # matmul FLOPs recomputed, fraction of a plain step's
    signature: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # where each number came from (see `memfit.planning.planner._sources`)
    coverage: float | None = None  # share of the plain step's saved activations inside the blocks
    predicted_step_time_s: float | None = None  # a plain step, by the time model (cost "time" only)

    @property
    def units(self) -> list[Unit]:
        units, i = [], 0
        while i < len(self.blocks):
            b = self.blocks[i]
            size = 1
            if b.segment:
                size = 1 + next(k for k in range(i, len(self.blocks)) if self.blocks[k].name == b.segment[1]) - i
            units.append(Unit(i, i + size, b.mode))
            i += size
        return units

    def __str__(self) -> str:
        kind = "time" if self.cost == "time" else "FLOPs"
        width = max(len(b.name) for b in self.blocks)
        lines = [
            f"plan for a budget of {fmt_bytes(self.budget_bytes)} (plain run: "
            f"{fmt_bytes(self.baseline_peak_bytes)}): predicted peak {fmt_bytes(self.predicted_peak_bytes)}, "
            f"+{self.predicted_overhead:.1%} {kind}"
        ]
        for b in self.blocks:
            saved = b.mode.saved_ops
            mode = f"{str(b.mode).partition(':')[0]} ({len(saved)})" if saved else str(b.mode)
            line = f"  {b.name:<{width}}  {mode:<9}  keeps {fmt_bytes(b.kept_bytes):>10}"
            if b.cost:
                line += f"  +{b.cost:.1%} {kind}"
            if b.segment:
                line += f"  (segment {b.segment[0]}..{b.segment[1]})"
            if saved:
                line += "  saves " + _abbreviated([f"{name}@{k}" for k, name in sorted(saved.items())])
            lines.append(line)
        lines += [f"  {what}: {where}" for what, where in self.sources.items()]
        if self.coverage is not None:
            lines.append(
                f"  coverage: {self.coverage:.0%} of the plain step's saved activations lie inside these "
                f"{len(self.blocks)} blocks"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The plan as JSON-ready data, each mode in its printed form."""
        return {**asdict(self), "blocks": [{**asdict(b), "mode": str(b.mode)} for b in self.blocks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
            data["blocks"] = [BlockChoice(**b) for b in data["blocks"]]
            plan = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
            plan._validate()
            return plan
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise MemfitError(
                f"not a memfit plan ({e}); make one with `memfit plan --json PATH` or Plan.to_json()."
            ) from None

    def _validate(self) -> None:
        """Raise ValueError unless the blocks form units: known modes, segments of consecutive blocks."""
        if not self.blocks:
            raise ValueError("it has no blocks")
        names = [b.name for b in self.blocks]
        for i, b in enumerate(self.blocks):
            if b.segment is not None:
                if (
                    not isinstance(b.segment, list)
                    or len(b.segment) != 2
                    or b.segment[0] not in names
                    or b.segment[1] not in names
                    or not names.index(b.segment[0]) <= i <= names.index(b.segment[1])
                ):
                    raise ValueError(f"block {b.name} names segment {b.segment!r}, which does not contain it")
        units = self.units
        if any(
            u.stop - u.start > 1
            and any(
                b.segment != self.blocks[u.start].segment or b.mode != u.mode for b in self.blocks[u.start : u.stop]
            )
            for u in units
        ):
            raise ValueError("a segment's blocks disagree on their segment or mode")

    @classmethod
    def load(cls, path) -> Plan:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except OSError as e:
            raise MemfitError(f"cannot read plan {path}: {e.strerror}; give the path of a plan JSON file.") from None
        except UnicodeDecodeError:
            raise MemfitError(
                f"plan {path} is not a text file; give a plan JSON file made by `memfit plan --json`."
            ) from None
        return cls.from_json(text)

    def check(self, names: list[str]) -> None:
        """Raise unless this plan was made for blocks with these names (in any order)."""
        mine = [b.name for b in self.blocks]
        if sorted(mine) != sorted(names):
            raise MemfitError(
                f"this plan was made for a model with {len(mine)} blocks ({mine[0]}..{mine[-1]}), "
                f"not this one with {len(names)} ({names[0]}..{names[-1]}); make a plan for this "
                f"model with memfit.plan or `memfit plan`."
            )


def _abbreviated(names, width=48) -> str:
    text = ", ".join(names)
    return text if len(text) <= width else text[:width].rsplit(", ", 1)[0] + f", ... ({len(names)} ops)"


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: `budget` to plan for, or else `strategy`: a strategy
    string (its name and argument checked), {chain: strategy string}, a
    `Plan`, or a list of `Unit`."""

    strategy: object = None
    budget: Budget | None = None

    def __str__(self) -> str:
        if self.budget is not None:
            return f"plan:{self.budget.text}"
        return self.strategy if isinstance(self.strategy, str) else type(self.strategy).__name__


def parse(value) -> Schedule:
    """A `Schedule` from any spelling above; a Schedule is returned as it is."""
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (Plan, Budget)):
        return Schedule(budget=value) if isinstance(value, Budget) else Schedule(value)
    if isinstance(value, (bool, int)):
        if value not in (0, 1):
            raise MemfitError(f"checkpointing {value!r} is not understood; give {SPELLINGS}.")
        return Schedule("blocks" if value else "none")
    if isinstance(value, (list, tuple)) and value and all(isinstance(u, Unit) for u in value):
        return Schedule(list(value))
    if isinstance(value, dict):
        return Schedule(_spellings_per_chain(value))
    if not isinstance(value, str):
        raise MemfitError(f"checkpointing {value!r} is not understood; give {SPELLINGS}.")
    text = value.strip()
    if text.lower() in OFF | ON:
        return Schedule("blocks" if text.lower() in ON else "none")
    head, sep, rest = text.partition(":")
    if sep and head.lower() in ("plan", "budget"):
        if rest.strip().endswith(".json"):
            if head.lower() == "budget":
                raise MemfitError(f"{text!r} names a plan file; write it plan:{rest.strip()}.")
            return Schedule(Plan.load(rest.strip()))
        return Schedule(budget=Budget.parse(rest))
    return Schedule(strategies.check(text))


def _spellings_per_chain(value: dict) -> dict:
    if not value or not all(isinstance(k, str) for k in value):
        raise MemfitError(
            f"a schedule per chain maps chains to strategies, like "
            f"{{'encoder.layers': 'blocks', 'decoder.layers': 'selective'}}; got {value!r}."
        )
    out = {}
    for chain, v in value.items():
        s = parse(False if v is None else v)  # YAML null: off
        if not isinstance(s.strategy, str):
            raise MemfitError(
                f"chain {chain!r} is given {v!r}; per chain give a strategy string such as blocks "
                f"or selective: one budget covers all chains, as plan:60% for the whole model."
            )
        out[chain] = s.strategy
    return out
