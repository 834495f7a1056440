"""A mixed-precision policy is data: module name -> (w_bits, a_bits), saved as versioned JSON.

Integer bits are 2..8; 32 means "leave this operand in fp32" (``FP32 = (32, 32)``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from lcpaq.errors import PolicyError

POLICY_SCHEMA = "lcpaq.policy/1"
MIN_BITS, MAX_BITS, FLOAT_BITS = 2, 8, 32
BitPair = tuple[int, int]
FP32: BitPair = (FLOAT_BITS, FLOAT_BITS)


def check_bits(w_bits: Any, a_bits: Any, *, where: str = "") -> BitPair:
    """Validate one (w_bits, a_bits) pair and return it as ints; raise PolicyError otherwise."""
    pair = []
    for what, b in (("w_bits", w_bits), ("a_bits", a_bits)):
        if isinstance(b, bool) or not isinstance(b, int):
            raise PolicyError(f"{where}{what}={b!r} is not an integer; use {MIN_BITS}..{MAX_BITS} or 32 (fp32)")
        if not (MIN_BITS <= b <= MAX_BITS or b == FLOAT_BITS):
            raise PolicyError(f"{where}{what}={b} is out of range; use {MIN_BITS}..{MAX_BITS} or 32 (fp32)")
        pair.append(b)
    return pair[0], pair[1]


def format_bits(pair: BitPair) -> str:
    """(4, 8) -> 'w4a8'; (32, 32) -> 'fp32'; (4, 32) -> 'w4a32'."""
    return "fp32" if tuple(pair) == FP32 else f"w{pair[0]}a{pair[1]}"


def parse_bits(text: str) -> BitPair:
    """'w4a8' -> (4, 8); 'fp32' -> (32, 32). Raises PolicyError on anything else."""
    t = text.strip().lower()
    if t == "fp32":
        return FP32
    if t.startswith("w") and "a" in t:
        w, _, a = t[1:].partition("a")
        if w.isdigit() and a.isdigit():
            return check_bits(int(w), int(a), where=f"'{text}': ")
    raise PolicyError(f"cannot parse bit pair '{text}'; write e.g. w4a8, w8a8 or fp32")


def parse_bits_list(text: str) -> tuple[BitPair, ...]:
    """'w4a8,w8a8,fp32' -> ((4, 8), (8, 8), (32, 32)); order kept, duplicates dropped."""
    out: list[BitPair] = []
    for part in text.split(","):
        if part.strip():
            p = parse_bits(part)
            if p not in out:
                out.append(p)
    if not out:
        raise PolicyError("empty bit list; write e.g. --bits w4a8,w8a8,fp32")
    return tuple(out)


@dataclass(frozen=True)
class Policy:
    """Frozen mapping module name -> (w_bits, a_bits).

    >>> p = Policy.uniform(["conv1", "fc"], 8, 8)
    >>> p["fc"]
    (8, 8)
    """

    bits: Mapping[str, BitPair]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean = {}
        for name, pair in dict(self.bits).items():
            if not isinstance(name, str) or not name:
                raise PolicyError(f"layer name {name!r} must be a non-empty string")
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise PolicyError(f"layer '{name}': expected [w_bits, a_bits], got {pair!r}")
            clean[name] = check_bits(pair[0], pair[1], where=f"layer '{name}': ")
        object.__setattr__(self, "bits", MappingProxyType(clean))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    # mapping-like access
    def __getitem__(self, name: str) -> BitPair:
        return self.bits[name]

    def __contains__(self, name: object) -> bool:
        return name in self.bits

    def __iter__(self):
        return iter(self.bits)

    def __len__(self) -> int:
        return len(self.bits)

    def items(self):
        return self.bits.items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and dict(self.bits) == dict(other.bits)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.bits.items())))

    @staticmethod
    def uniform(names: Iterable[str], w_bits: int, a_bits: int, **meta: Any) -> Policy:
        return Policy({n: (w_bits, a_bits) for n in names}, meta=meta)

    def replace(self, **changes: BitPair) -> Policy:
        """A copy with some layers changed: ``p.replace(**{"layer1.0.conv1": (4, 8)})``."""
        new = dict(self.bits)
        new.update(changes)
        return Policy(new, meta=self.meta)

    def validate(self, layer_names: Iterable[str]) -> Policy:
        """Check the policy covers exactly ``layer_names``; raise PolicyError naming the layer."""
        names = list(layer_names)
        known = set(names)
        unknown = [n for n in self.bits if n not in known]
        if unknown:
            raise PolicyError(
                f"policy names unknown layer '{unknown[0]}'"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + "; run `lcpaq inspect --model NAME` for the layer names"
            )
        missing = [n for n in names if n not in self.bits]
        if missing:
            raise PolicyError(
                f"policy has no bits for layer '{missing[0]}'"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; every quantizable layer needs [w_bits, a_bits]"
            )
        return self

    # --- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": POLICY_SCHEMA,
            "layers": {n: list(p) for n, p in self.bits.items()},
            "meta": dict(self.meta),
        }

    @staticmethod
    def from_dict(d: Any, *, source: str = "policy") -> Policy:
        if not isinstance(d, dict):
            raise PolicyError(f"{source}: expected a JSON object with 'schema' and 'layers'")
        if d.get("schema") != POLICY_SCHEMA:
            raise PolicyError(
                f"{source}: schema is {d.get('schema')!r}, expected '{POLICY_SCHEMA}'"
            )
        layers = d.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise PolicyError(f"{source}: 'layers' must be a non-empty object name -> [w_bits, a_bits]")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise PolicyError(f"{source}: 'meta' must be an object")
        try:
            return Policy(layers, meta=meta)
        except PolicyError as e:
            raise PolicyError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) so a crash never leaves half a policy."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @staticmethod
    def load(path: str | Path, *, layer_names: Iterable[str] | None = None) -> Policy:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            raise PolicyError(f"policy file {p} does not exist") from None
        except json.JSONDecodeError as e:
            raise PolicyError(f"policy file {p} is not valid JSON: {e}") from None
        pol = Policy.from_dict(d, source=str(p))
        if layer_names is not None:
            try:
                pol.validate(layer_names)
            except PolicyError as e:
                raise PolicyError(f"{p}: {e}") from None
        return pol

    def summary(self) -> str:
        from collections import Counter

        c = Counter(format_bits(p) for p in self.bits.values())
        return ", ".join(f"{k}x{v}" for k, v in sorted(c.items()))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
