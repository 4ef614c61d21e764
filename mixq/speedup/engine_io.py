"""What an engine takes and returns: named inputs of fixed dtype and shape (dynamic batch), and
the model's own output structure; validation of user data with a one-line error per mistake.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..compressor.model_io import ModelInputs, OutputStructure

_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.float16, torch.float64, torch.int64,
                                                      torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


@dataclass(frozen=True)
class InputSpec:
    """One engine input: its name, dtype and shape without the (dynamic) batch axis."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name!r} of shape {('N',) + self.shape} and dtype {self.dtype}"


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported input dtype {name!r}; engines take {sorted(_DTYPES)}") from None



@dataclass
class EngineIO:
    """The inputs (positional or keyword) and outputs of an engine."""

    inputs: List[InputSpec]
    keyword: bool                                   # the model takes keyword inputs (a dict)
    output_names: List[str]
    output_structure: Optional[OutputStructure] = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_shapes(cls, shapes: Sequence[Sequence[int]]) -> "EngineIO":
        """float32 positional inputs of the given shapes (batch axis first)."""
        names = ModelInputs(tuple(torch.empty(0) for _ in shapes)).names()
        return cls([InputSpec(n, torch.float32, tuple(s[1:])) for n, s in zip(names, shapes)], False, [])

    @classmethod
    def from_example(cls, example: ModelInputs) -> "EngineIO":
        specs = [InputSpec(n, t.dtype, tuple(t.shape[1:])) for n, t in zip(example.names(), example.tensors())]
        return cls(specs, bool(example.kwargs), [])

    def to_meta(self) -> Dict[str, Any]:
        return {"inputs": [{"name": s.name, "dtype": str(s.dtype).replace("torch.", ""), "shape": list(s.shape)}
                           for s in self.inputs],
                "keyword_inputs": self.keyword, "output_names": list(self.output_names),
                "output_keys": list(self.output_structure.keys) if self.output_structure else []}

    @classmethod
    def from_meta(cls, meta: Dict[str, Any]) -> "EngineIO":
        specs = [InputSpec(str(i["name"]), _dtype(str(i["dtype"])), tuple(int(d) for d in i["shape"]))
                 for i in meta["inputs"]]
        keys = tuple(meta.get("output_keys") or ())
        names = list(meta["output_names"])
        structure = OutputStructure("mapping", dict, keys, len(keys)) if keys else \
            OutputStructure("tensor" if len(names) == 1 else "sequence", tuple, (), len(names))
        return cls(specs, bool(meta.get("keyword_inputs", False)), names, structure)

    # -- data ----------------------------------------------------------------------------------
    def example(self, batch: int, seed: int = 0) -> ModelInputs:
        """Inputs of ``batch`` samples: normal floats, zeros for integers."""
        gen = torch.Generator().manual_seed(seed)
        tensors = [torch.randn((batch,) + s.shape, generator=gen).to(s.dtype) if s.dtype.is_floating_point
                   else torch.zeros((batch,) + s.shape, dtype=s.dtype) for s in self.inputs]
        if self.keyword:
            return ModelInputs((), {s.name: t for s, t in zip(self.inputs, tensors)})
        return ModelInputs(tuple(tensors))

    def zeros(self, batch: int) -> List[np.ndarray]:
        return [torch.zeros((batch,) + s.shape, dtype=s.dtype).numpy() for s in self.inputs]

    def _items(self, data: Any) -> List[Any]:
        n = len(self.inputs)
        if self.keyword:
            if not isinstance(data, dict):
                raise TypeError(f"the engine takes a dict of named inputs {[s.name for s in self.inputs]}, got "
                                f"{type(data).__name__}")
            missing = [s.name for s in self.inputs if s.name not in data]
            extra = [k for k in data if k not in {s.name for s in self.inputs}]
            if missing or extra:
                raise ValueError(f"the engine takes inputs {[s.name for s in self.inputs]}; "
                                 + (f"missing {missing}" if missing else "") + (", " if missing and extra else "")
                                 + (f"unknown {extra}" if extra else ""))
            return [data[s.name] for s in self.inputs]
        items = list(data) if isinstance(data, (tuple, list)) else [data]
        if len(items) != n:
            raise ValueError(f"the engine takes {n} input(s), got {len(items)}: pass "
                             f"{'one tensor' if n == 1 else 'a tuple of ' + str(n) + ' tensors'}")
        return items

    def validate(self, data: Any) -> List[np.ndarray]:
        """``data`` (the structure the model takes) as arrays in graph-input order."""
        arrays = []
        for spec, item in zip(self.inputs, self._items(data)):
            where = "the input" if len(self.inputs) == 1 else f"input {spec.name!r}"
            if isinstance(item, np.ndarray):
                item = torch.from_numpy(item)
            if not torch.is_tensor(item):
                raise TypeError(f"{where} must be a torch tensor, got {type(item).__name__}")
            if item.is_sparse or item.layout != torch.strided:
                raise TypeError(f"{where} is a {item.layout} tensor; pass a dense one (x.to_dense())")
            if item.device.type == "meta":
                raise ValueError(f"{where} is on the meta device and holds no data; pass real data")
            expected = ("N",) + spec.shape
            if item.dim() != len(expected):
                raise ValueError(f"{where} has shape {tuple(item.shape)} (rank {item.dim()}); the engine expects "
                                 f"{expected} (rank {len(expected)}): add or remove dimensions, e.g. x.unsqueeze(0)")
            if tuple(item.shape[1:]) != spec.shape:
                raise ValueError(f"{where} has shape {tuple(item.shape)}; the engine was built for {expected}: "
                                 "resize the data or build the engine with that shape")
            if item.shape[0] == 0:
                raise ValueError(f"{where} has batch size 0; pass at least one sample")
            if item.dtype != spec.dtype:
                cast = {torch.float32: "x.float()", torch.int64: "x.long()", torch.int32: "x.int()",
                        torch.bool: "x.bool()"}.get(spec.dtype, f"x.to({spec.dtype})")
                raise ValueError(f"{where} has dtype {item.dtype}; the engine takes {spec.dtype}: pass {cast}")
            array = item.detach().cpu().contiguous().numpy()
            # numpy, not torch: torch's OpenMP pool would spin beside the engine's threads
            # NaN propagates through min/max and an infinity is one of them: two reductions, no mask
            if array.dtype.kind == "f" and array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
                bad = "NaN" if np.isnan(array).any() else "infinity"
                raise ValueError(f"{where} contains {bad}; clean the data (e.g. torch.nan_to_num) before inference")
            arrays.append(array)
        sizes = {a.shape[0] for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"the inputs have different batch sizes {sorted(sizes)}; they must match")
        return arrays

    def rebuild(self, outputs: Sequence[torch.Tensor]) -> Any:
        """The model's own output structure around ``outputs`` (graph-output order)."""
        structure = self.output_structure or OutputStructure("tensor" if len(outputs) == 1 else "sequence", tuple)
        return structure.rebuild(list(outputs))
