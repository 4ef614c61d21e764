"""Config-list validation (NNI 2.x keys, checked with ``schema``) and layer selection.

Every mistake is a :class:`ConfigError` (a ``schema.SchemaError``) naming the entry index,
the key and, for unknown names or keys, the closest valid ones.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch.nn as nn
from schema import And, Or, Schema, SchemaError
from schema import Optional as Opt

from ..messages import close_matches, short_repr
from .wrapped import is_wrapper
from .fake_quant import DTYPES, is_per_channel, is_symmetric
from .scheme import SCHEMES

QUANT_TYPES = ("weight", "input", "output")
WEIGHT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
DEFAULT_SCHEME = {"weight": "per_channel_symmetric", "input": "per_tensor_symmetric",
                  "output": "per_tensor_symmetric"}
DEFAULT_DTYPE = "int"
# what an engine can run: integer grids (1..8 bits, in int8 kernels), fp16 and fp32
ALLOWED_BITS = tuple(range(1, 9)) + (16, 32)
BITS_HELP = "1..8 (integer), 16 (fp16) or 32 (fp32)"
logger = logging.getLogger(__name__)


class ConfigError(SchemaError):
    """A config list that cannot be applied as written."""

    def __init__(self, message: str) -> None:
        super().__init__(message)



def _per_type(value_schema: Any) -> Any:
    return Or(value_schema, {Opt(Or(*QUANT_TYPES)): value_schema})


@dataclass
class LayerQuantConfig:
    """The resolved quantization settings of one module (the last matching entry wins)."""

    name: str
    module_type: str
    quant_types: List[str]
    bits: Dict[str, int]
    scheme: Dict[str, str]
    dtype: Dict[str, str]
    quant_start_step: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)
    explicit: Set[Tuple[str, str]] = field(default_factory=set)  # ('scheme'|'dtype', quant type) the entry set
    dynamic: bool = False  # activations quantized at run time (per tensor, u8), weights int8


class ConfigListSpec:
    """What one quantizer accepts: quant types, bit range and extra keys (validated by schema)."""

    def __init__(self, quant_types: Sequence[str] = QUANT_TYPES, max_bits: int = 32,
                 extra_keys: Optional[Dict[str, Any]] = None, quantizer: str = "Quantizer") -> None:
        self.quant_types = tuple(quant_types)
        self.max_bits = max_bits
        self.extra_keys = dict(extra_keys or {})
        self.quantizer = quantizer
        self.excluded: Set[str] = set()  # after resolve(): modules an exclude entry removed
        bits = And(int, lambda b: type(b) is int and b in ALLOWED_BITS, error=f"bit widths must be {BITS_HELP}")
        self.keys = {
            "quant_types": And([Or(*QUANT_TYPES)], len, error=f"quant_types must be a non-empty list of {list(QUANT_TYPES)}"),
            "quant_bits": Or(bits, {Opt(Or(*QUANT_TYPES)): bits},
                             error=f"quant_bits must be {BITS_HELP} (what an engine runs), or a dict {{{{type: bits}}}}"),
            "op_types": And([str], len, error="op_types must be a non-empty list of module type names"),
            "op_names": And([str], len, error="op_names must be a non-empty list of module names"),
            "exclude": bool,
            "quant_start_step": And(int, lambda s: s >= 0, error="quant_start_step must be an int >= 0"),
            "quant_dynamic": bool,
            "quant_scheme": _per_type(Or(*SCHEMES, error=f"quant_scheme must be one of {list(SCHEMES)}")),
            "quant_dtype": _per_type(Or(*DTYPES, error=f"quant_dtype must be one of {list(DTYPES)}")),
            **self.extra_keys,
        }

    def _check_entry(self, index: int, entry: Any) -> None:
        where = f"config_list[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a dict, got {type(entry).__name__}")
        for key in entry:
            if key not in self.keys:
                raise ConfigError(f"{where}: unknown key {short_repr(key)} for {self.quantizer}"
                                  f"{close_matches(str(key), self.keys)}")
        for key, value in entry.items():
            try:
                Schema(self.keys[key]).validate(value)
            except SchemaError as exc:
                raise ConfigError(f"{where}['{key}'] = {short_repr(value)}: {exc.code.splitlines()[0]}") from None
        if "op_types" not in entry and "op_names" not in entry:
            raise ConfigError(f"{where} selects no layer: give 'op_types' and/or 'op_names'")
        if entry.get("exclude"):
            return
        for key in ("quant_types", "quant_bits"):
            if key not in entry:
                raise ConfigError(f"{where} is missing the required key {key!r}")
        types = entry["quant_types"]
        if entry.get("quant_dynamic") and (types != ["weight"] or _lookup(entry["quant_bits"], "weight") != 8):
            raise ConfigError(f"{where}: 'quant_dynamic': True quantizes the activations at run time, so it takes "
                              "'quant_types': ['weight'] and 'quant_bits': 8")
        for qtype in types:
            if qtype not in self.quant_types:
                raise ConfigError(f"{where}['quant_types']: {self.quantizer} cannot quantize {qtype!r}; "
                                  f"it supports {list(self.quant_types)}")
        for key in ("quant_bits", "quant_scheme", "quant_dtype"):
            value = entry.get(key)
            if isinstance(value, dict):
                stray = [t for t in value if t not in types]
                if stray:
                    raise ConfigError(f"{where}['{key}'] sets {stray} which are not in quant_types {types}")
                if key == "quant_bits" and set(value) != set(types):
                    raise ConfigError(f"{where}['quant_bits'] gives no bit width for "
                                      f"{[t for t in types if t not in value]}")
        for qtype in types:
            bits = _lookup(entry["quant_bits"], qtype)
            if bits > self.max_bits:
                raise ConfigError(f"{where}['quant_bits']: {self.quantizer} supports at most {self.max_bits} bits "
                                  f"for {qtype}, got {bits}")
            scheme = _lookup(entry.get("quant_scheme"), qtype) or DEFAULT_SCHEME[qtype]
            if qtype != "weight" and is_per_channel(scheme):
                raise ConfigError(f"{where}['quant_scheme']: {qtype} activations are quantized per tensor; "
                                  f"use 'per_tensor_symmetric' or 'per_tensor_affine', not {scheme!r}")
            if bits == 1 and is_symmetric(scheme):
                raise ConfigError(f"{where}: 1-bit {qtype} needs an affine quant_scheme (symmetric needs >= 2 bits)")

    def resolve(self, model: nn.Module, config_list: Any) -> Dict[str, LayerQuantConfig]:
        """Validate ``config_list`` against ``model``; return the settings per selected module name."""
        if not isinstance(config_list, list) or not config_list:
            raise ConfigError("config_list must be a non-empty list of dicts")
        modules = dict(model.named_modules())
        type_names = {cls.__name__ for m in modules.values() for cls in type(m).__mro__[:-2]}  # not Module, object
        aliases = module_aliases(model)
        layers: Dict[str, LayerQuantConfig] = {}
        type_names.add(MATMUL)
        for index, entry in enumerate(config_list):
            self._check_entry(index, entry)
            matched = self._match(index, entry, modules, type_names, aliases)
            for name in matched:
                if is_matmul_site(name):
                    if entry.get("exclude"):
                        layers.pop(name, None)
                    else:
                        layers[name] = self._matmul_config(index, entry, name)
                    continue
                if entry.get("exclude"):
                    layers.pop(name, None)
                    self.excluded.add(name)
                    continue
                self.excluded.discard(name)
                layers[name] = self._layer_config(index, entry, name, modules[name])
        if not layers:
            raise ConfigError("config_list selects no layer to quantize (every match was excluded)")
        return layers

    def _match(self, index: int, entry: Dict[str, Any], modules: Dict[str, nn.Module], type_names: set,
               aliases: Dict[str, str]) -> List[str]:
        where = f"config_list[{index}]"
        names = [n for n in modules if n] + list(aliases)
        op_names = []
        for name in entry.get("op_names", []):
            if name in aliases:
                logger.info("%s['op_names']: %r is another name of module %r, which is configured (and exported) "
                            "under that name", where, name, aliases[name])
                name = aliases[name]
            op_names.append(name)
            if name not in modules or not name:
                raise ConfigError(f"{where}['op_names']: {short_repr(name)} is not a module of the model"
                                  f"{close_matches(name, names)}")
        op_types = entry.get("op_types")
        absent = [t for t in op_types or [] if t != "default" and t not in type_names]
        if op_types and len(absent) == len(op_types):
            raise ConfigError(f"{where}['op_types']: no module of type {short_repr(absent[0])} in the model"
                              f"{close_matches(absent[0], type_names | {'default'})}")
        for op_type in absent:
            logger.warning("%s['op_types']: no module of type %r in the model%s", where, op_type,
                           close_matches(op_type, type_names | {"default"}))
        matched = []
        if op_types and MATMUL in op_types:  # matrix products of two activations, by module scope
            matched += [matmul_site(scope) for scope in (op_names or [""])]
        for name, module in modules.items():
            if not name or is_wrapper(module):
                continue
            if "op_names" in entry and name not in op_names:
                continue
            if op_types is not None and not _type_matches(module, op_types):
                continue
            matched.append(name)
        if not matched:
            raise ConfigError(f"{where} matches no module: op_names {short_repr(entry.get('op_names'))} "
                              f"with op_types {op_types} select nothing in this model")
        return matched

    def _layer_config(self, index: int, entry: Dict[str, Any], name: str, module: nn.Module) -> LayerQuantConfig:
        types = [t for t in QUANT_TYPES if t in entry["quant_types"]]
        if "weight" in types and not isinstance(module, WEIGHT_TYPES):
            raise ConfigError(f"config_list[{index}]: cannot quantize the weight of {name!r} "
                              f"({type(module).__name__}); weight quantization supports "
                              f"{[t.__name__ for t in WEIGHT_TYPES]}. Drop 'weight' from quant_types for it")
        return LayerQuantConfig(
            name=name, module_type=type(module).__name__, quant_types=types,
            bits={t: _lookup(entry["quant_bits"], t) for t in types},
            scheme={t: _lookup(entry.get("quant_scheme"), t) or DEFAULT_SCHEME[t] for t in types},
            dtype={t: _lookup(entry.get("quant_dtype"), t) or DEFAULT_DTYPE for t in types},
            quant_start_step=entry.get("quant_start_step", 0),
            extra={k: entry[k] for k in self.extra_keys if k in entry},
            explicit={(key, t) for key in ("scheme", "dtype") for t in types
                      if _lookup(entry.get(f"quant_{key}"), t) is not None},
            dynamic=self._dynamic(index, entry, name, module))

    def _matmul_config(self, index: int, entry: Dict[str, Any], name: str) -> LayerQuantConfig:
        types = [t for t in QUANT_TYPES if t in entry["quant_types"]]
        if types != ["input"] or entry.get("quant_dynamic"):
            raise ConfigError(f"config_list[{index}]: 'MatMul' selects matrix products of two activations "
                              "(attention's Q K^T and softmax V); quantize their operands with "
                              "'quant_types': ['input'] (static)")
        return LayerQuantConfig(
            name=name, module_type=MATMUL, quant_types=types, bits={"input": _lookup(entry["quant_bits"], "input")},
            scheme={"input": _lookup(entry.get("quant_scheme"), "input") or DEFAULT_SCHEME["input"]},
            dtype={"input": _lookup(entry.get("quant_dtype"), "input") or DEFAULT_DTYPE},
            quant_start_step=entry.get("quant_start_step", 0),
            extra={k: entry[k] for k in self.extra_keys if k in entry},
            explicit={(key, "input") for key in ("scheme", "dtype") if _lookup(entry.get(f"quant_{key}"), "input")})

    @staticmethod
    def _dynamic(index: int, entry: Dict[str, Any], name: str, module: nn.Module) -> bool:
        if not entry.get("quant_dynamic"):
            return False
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"config_list[{index}]: 'quant_dynamic' applies to Linear layers; {name!r} is a "
                              f"{type(module).__name__}: select it in a static entry")
        return True


MATMUL = "MatMul"
_MATMUL_SUFFIX = "::" + MATMUL


def matmul_site(scope: str) -> str:
    """The config layer name of the activation-activation matrix products in module ``scope``
    (and the modules under it): ``'encoder.layer.0.attention::MatMul'``, ``'::MatMul'`` for all."""
    return scope + _MATMUL_SUFFIX


def is_matmul_site(name: str) -> bool:
    return name.endswith(_MATMUL_SUFFIX)


def matmul_scope(name: str) -> str:
    return name[:-len(_MATMUL_SUFFIX)]


def module_aliases(model: nn.Module) -> Dict[str, str]:
    """``{other name: first name}`` of every module registered under several names
    (``self.alias = self.conv``); the first name is the one ``named_modules()`` gives."""
    first: Dict[int, str] = {}
    aliases = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in first and name:
            aliases[name] = first[id(module)]
        else:
            first.setdefault(id(module), name)
    return aliases


def module_names(model: nn.Module, name: str) -> List[str]:
    """Every name under which the module called ``name`` is registered, ``name`` first."""
    target = model.get_submodule(name)
    return [name] + [n for n, m in model.named_modules(remove_duplicate=False) if m is target and n != name]


def _lookup(value: Any, qtype: str) -> Any:
    return value.get(qtype) if isinstance(value, dict) else value


def _type_matches(module: nn.Module, op_types: List[str]) -> bool:
    """By class name or the name of a base class (``NonDynamicallyQuantizableLinear`` is a Linear)."""
    if "default" in op_types and isinstance(module, WEIGHT_TYPES):
        return True
    return any(cls.__name__ in op_types for cls in type(module).__mro__ if cls not in (nn.Module, object))

