"""Post-training quantization by block reconstruction: AdaRound / BRECQ / QDrop, and PTMQ's
multi-bit activations.

``compress()`` runs, in order:

1. BatchNorm folding: every Conv->BN pair is found with one forward and the quantizer works on
   the folded weight ``w * gamma / sqrt(var + eps)`` (the BN module itself keeps running, so the
   model's structure and state_dict keys do not change; the export records ``folded_bn``).
2. Calibration: one float pass over the calibration samples; weight ranges are MSE-searched per
   output channel and activation ranges per bit width (then fixed for weights).
3. Reconstruction, unit by unit in execution order (:mod:`.blocks`): the unit's input is taken
   from the partly quantized model (every earlier unit already final), its target from the
   float model. The weights' rounding (AdaRound) and the activation ranges of the unit are
   trained to reproduce the target, with QDrop (each activation element keeps its float value
   with probability ``drop_prob``). With ``activation_bits=(low, mid, high)`` the loss is PTMQ's:
   the output of the mixed-feature forward (every activation a random convex combination of
   its three quantized versions) against the target, plus group-wise distillation (the high
   output against the target, the mid and low outputs against the high one); earlier units
   then run at the mid level to produce the unit's input. The weights' rounding is shared by
   the three levels, each level has its own activation ranges.
4. Write-back: the learned integer weights are written into the float weights (divided by the BN
   factor where a BN is folded), so that round-to-nearest with the exported scale gives
   exactly the learned integers. From here on the wrapped model runs the framework's ordinary
   fake quantization and ``export_model`` needs nothing special: the exported float weights
   plus the calibration reproduce the reconstructed model in any deployment.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from tqdm import tqdm

from ..compressor.calibration_record import CalibrationRecord
from ..compressor.config import ConfigError, ConfigListSpec
from ..compressor.fake_quant import is_integer_bits, is_per_channel, is_symmetric, qparams_from_range, quant_range
from ..compressor.model_io import model_device
from ..compressor.observers import MSEObserver
from ..compressor.layers import weight_axis
from ..compressor.quantizer import Quantizer
from ..compressor.wrapper import QuantizerModuleWrapper
from .adaround import AdaRound, beta_schedule
from .blocks import Unit, UnitSpec, capture, find_units, units_from_names
from .calib_data import calibration_tensor
from .multibit import MultiBitActivation

logger = logging.getLogger(__name__)

LEVELS = ("low", "mid", "high")
ROUNDINGS = ("nearest", "adaround")
FIXED_ACTIVATION_BITS = 8  # activations configured at this width or wider keep it under activation_bits
_CAPTURE_BATCH = 256


def _block_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over the batch and positions (the scale at which
    AdaRound's regulariser weight 0.01 is balanced)."""
    return (out - target).pow(2).sum(1).mean()


class ReconstructionQuantizer(Quantizer):
    """Post-training quantization that reconstructs each block's output (see the module docstring).

    ``ReconstructionQuantizer(model, config_list, calib_data, **options)``; ``compress()`` runs the
    reconstruction; ``export_model(...)`` as for every quantizer. Options:

    * ``rounding``: ``'adaround'`` (learned, default) or ``'nearest'`` (only ranges are learned).
    * ``drop_prob``: QDrop probability that an activation element skips quantization while
      reconstructing (default 0.5; 0 disables it, as in BRECQ).
    * ``iterations``: optimisation steps per unit (default 2000); 0 gives plain round-to-nearest
      with MSE-searched ranges.
    * ``num_samples`` (default 1024) calibration samples, ``batch_size`` (default 32) per step.
    * ``activation_bits``: ``(low, mid, high)`` for PTMQ multi-bit activations. It replaces the
      bit width of every quantized activation configured below 8 bits; activations configured
      at 8 bits or more (usually the first and last layers) keep theirs. Switch with
      :meth:`set_activation_bits` (``'high'`` after ``compress()``).
    * ``blocks``: explicit units instead of the automatic ones, e.g.
      ``['layer1.0', ['conv1', 'bn1', 'relu']]`` (a module, or modules run in sequence).
    * ``weight_lr``: Adam learning rate of AdaRound's V; default ``max(1e-3, 4 / iterations)``, so
      that V can cross the +-2.4 band where the rounding saturates at 0 or 1 within a short budget
      (Adam moves a parameter about ``lr`` per step). ``range_lr`` (relative activation range,
      default 1e-3), ``round_weight`` (regulariser weight, default 0.01), ``warmup`` (fraction of
      steps before the regulariser starts, default 0.2), ``progress`` (tqdm bar per unit with
      the loss), ``seed``.
    """

    def __init__(self, model: nn.Module, config_list: List[Dict[str, Any]], calib_data: Any, *,
                 rounding: str = "adaround", drop_prob: float = 0.5, iterations: int = 2000,
                 num_samples: int = 1024, batch_size: int = 32,
                 activation_bits: Optional[Sequence[int]] = None,
                 blocks: Optional[Sequence[UnitSpec]] = None, weight_lr: Optional[float] = None,
                 range_lr: float = 1e-3,
                 round_weight: float = 0.01, warmup: float = 0.2, progress: bool = True, seed: int = 0) -> None:
        if rounding not in ROUNDINGS:
            raise ConfigError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
        if not 0.0 <= drop_prob < 1.0:
            raise ConfigError(f"drop_prob must be in [0, 1), got {drop_prob}")
        if iterations < 0 or num_samples < 1 or batch_size < 1:
            raise ConfigError("iterations must be >= 0, num_samples and batch_size >= 1")
        if activation_bits is not None:
            activation_bits = tuple(activation_bits)
            if len(activation_bits) != 3 or not all(isinstance(b, int) and 2 <= b <= 8 for b in activation_bits) \
                    or not activation_bits[0] < activation_bits[1] < activation_bits[2]:
                raise ConfigError(f"activation_bits must be three increasing ints in 2..8 (low, mid, high), "
                                  f"got {activation_bits}")
        self.calib_data = calibration_tensor(calib_data, num_samples)
        self.float_model = copy.deepcopy(model).eval()
        super().__init__(model, config_list)
        self.rounding, self.drop_prob, self.iterations = rounding, drop_prob, iterations
        self.batch_size, self.activation_bits = batch_size, activation_bits
        self.weight_lr = weight_lr if weight_lr is not None else max(1e-3, 4.0 / max(iterations, 1))
        self.range_lr, self.round_weight, self.warmup = range_lr, round_weight, warmup
        self.progress, self.seed = progress, seed
        self.active_level = "high"
        self.rounding_values: Dict[str, torch.Tensor] = {}
        # the layers run in float until compress(): observed while calibrating, quantized from then on
        self.disable_observer()
        self.disable_fake_quant()
        self._level: Optional[int] = 0
        self._drop = 0.0
        for wrapper in self.modules_wrapper.values():
            if "weight" in wrapper.config.quant_types and is_integer_bits(wrapper.config.bits["weight"]):
                wrapper.add_weight_range()
        self._adarounds: Dict[str, AdaRound] = {}
        self._training: Dict[Tuple[str, str], MultiBitActivation] = {}
        self.activations = self._make_activation_quantizers()
        example = self.calib_data[:2].to(model_device(self.bound_model))
        self._attach_batchnorms(example)
        self.units = units_from_names(model, blocks) if blocks is not None else find_units(model, example)

    @classmethod
    def config_spec(cls) -> ConfigListSpec:
        return ConfigListSpec(quantizer=cls.__name__)

    @property
    def compressed(self) -> bool:
        """Whether :meth:`compress` has run (the layers are fake-quantized)."""
        return any(fake_quant for _, fake_quant in self._switch_states())

    def _make_activation_quantizers(self) -> Dict[Tuple[str, str], MultiBitActivation]:
        acts = {}
        multi = False
        for name, wrapper in self.modules_wrapper.items():
            cfg = wrapper.config
            for qtype in ("input", "output"):
                if qtype not in cfg.quant_types or not is_integer_bits(cfg.bits[qtype]):
                    continue
                bits: Tuple[int, ...] = (cfg.bits[qtype],)
                if self.activation_bits is not None and cfg.bits[qtype] < FIXED_ACTIVATION_BITS:
                    bits, multi = self.activation_bits, True
                acts[(name, qtype)] = MultiBitActivation(bits, cfg.scheme[qtype], cfg.dtype[qtype]).to(model_device(self.bound_model))
        if self.activation_bits is not None and not multi:
            raise ConfigError("activation_bits applies to activations configured below 8 bits, and this config_list "
                              "quantizes none; set their 'quant_bits' below 8 or drop activation_bits")
        return acts

    # Hooks called by the wrappers ------------------------------------------------------------
    def quantize_weight(self, wrapper: QuantizerModuleWrapper, weight: torch.Tensor) -> torch.Tensor:
        adaround = self._adarounds.get(wrapper.name)
        if adaround is not None:
            return adaround()
        return super().quantize_weight(wrapper, weight)

    def observe_activation(self, wrapper: QuantizerModuleWrapper, qtype: str, x: torch.Tensor) -> None:
        act = self.activations.get((wrapper.name, qtype))
        if act is not None:
            act.observe(x)

    def fake_quant_activation(self, wrapper: QuantizerModuleWrapper, qtype: str, x: torch.Tensor) -> torch.Tensor:
        training = self._training.get((wrapper.name, qtype))
        if training is not None:  # the unit being reconstructed: learnable ranges, QDrop
            return training(x, self._level, self._drop)
        return super().fake_quant_activation(wrapper, qtype, x)

    # Run-time bit switching ------------------------------------------------------------------
    def set_activation_bits(self, level: str) -> None:
        """Switch every multi-bit activation to ``'low'``, ``'mid'`` or ``'high'`` (no recomputation);
        the forward and ``export_model`` then use that choice."""
        if self.activation_bits is None:
            raise RuntimeError("this quantizer has one activation bit width; pass activation_bits=(low, mid, high) "
                               "to ReconstructionQuantizer for run-time switching")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {list(LEVELS)}, got {level!r}")
        if not self.compressed:
            raise RuntimeError("call compress() before set_activation_bits()")
        self._apply_level(LEVELS.index(level))
        self.active_level = level

    def _apply_level(self, level: int) -> None:
        with torch.no_grad():
            for (name, qtype), act in self.activations.items():
                wrapper = self.modules_wrapper[name]
                bits, lo, hi = act.export_range(level)
                wrapper.config.bits[qtype] = bits
                for buffer, value in zip(wrapper.tracked_range(qtype), (lo, hi)):
                    buffer.copy_(value)

    # Compression -----------------------------------------------------------------------------
    def compress(self) -> nn.Module:
        """Calibrate, reconstruct every unit, write the learned weights back; return the model."""
        if self.compressed:
            return self.bound_model
        model = self.bound_model
        was_training = model.training
        frozen = [p for p in model.parameters() if p.requires_grad]  # only rounding and ranges are trained
        model.eval()
        device = model_device(self.bound_model)
        try:
            for param in frozen:
                param.requires_grad_(False)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                self._calibrate(device)
                self.enable_fake_quant()
                for index, unit in enumerate(self.units):
                    self._reconstruct(unit, index, device)
        except BaseException:
            self.disable_fake_quant()  # not compressed: a second compress() starts over
            raise
        finally:
            for param in frozen:
                param.requires_grad_(True)
            model.train(was_training)
        self._apply_level(len(LEVELS) - 1)
        return model

    def _calibrate(self, device: torch.device) -> None:
        self.enable_observer()
        with torch.no_grad():
            for i in range(0, len(self.calib_data), _CAPTURE_BATCH):
                self.bound_model(self.calib_data[i:i + _CAPTURE_BATCH].to(device))
            self.disable_observer()
            for act in self.activations.values():
                act.init_ranges()
            for name, wrapper in self.modules_wrapper.items():
                cfg = wrapper.config
                if "weight" in cfg.quant_types and is_integer_bits(cfg.bits["weight"]):
                    scheme = cfg.scheme["weight"]
                    observer = MSEObserver(axis=weight_axis(wrapper.module) if is_per_channel(scheme) else None)
                    observer.update(wrapper.effective_weight())
                    for buffer, value in zip(wrapper.weight_range_buffers,
                                             observer.compute_range(cfg.bits["weight"], scheme, cfg.dtype["weight"])):
                        buffer.copy_(value)
        self._apply_level(len(LEVELS) - 1)

    def _unit_wrappers(self, unit: Unit) -> List[QuantizerModuleWrapper]:
        found = []
        for name in unit.modules:
            found += [m for m in self.bound_model.get_submodule(name).modules() if isinstance(m, QuantizerModuleWrapper)]
        return found

    def _make_adaround(self, wrapper: QuantizerModuleWrapper) -> AdaRound:
        cfg = wrapper.config
        scheme, dtype, bits = cfg.scheme["weight"], cfg.dtype["weight"], cfg.bits["weight"]
        scale, zero_point = qparams_from_range(*wrapper.weight_range_buffers, bits, scheme, dtype)
        qmin, qmax = quant_range(bits, dtype, is_symmetric(scheme))
        axis = weight_axis(wrapper.module) if is_per_channel(scheme) else None
        return AdaRound(wrapper.effective_weight(), scale, zero_point, qmin, qmax, axis)

    def _reconstruct(self, unit: Unit, index: int, device: torch.device) -> None:
        names = {w.name for w in self._unit_wrappers(unit)}
        if not names or not self.iterations:
            return
        data = self.calib_data.to(device)
        self._apply_level(1)  # earlier units run at the mid level (the only level where there is one)
        inputs = capture(self.bound_model, unit.modules[0], "input", data, _CAPTURE_BATCH)
        targets = capture(self.float_model, unit.modules[-1], "output", data, _CAPTURE_BATCH)
        if self.rounding == "adaround":
            self._adarounds = {n: self._make_adaround(self.modules_wrapper[n]) for n in names
                               if self.modules_wrapper[n].weight_range_buffers is not None}
        self._training = {k: a for k, a in self.activations.items() if k[0] in names}
        self._optimize(unit, index, inputs, targets)
        for name, adaround in self._adarounds.items():
            self._write_back(self.modules_wrapper[name], adaround)
        self._adarounds, self._training = {}, {}

    def _optimize(self, unit: Unit, index: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Adam on AdaRound's V (constant learning rate) and the range gains (cosine decay)."""
        rounding = [a.v for a in self._adarounds.values()]
        gains = [p for a in self._training.values() for p in (a.min_gain, a.max_gain)]
        if not rounding and not gains:
            return
        optimizer = torch.optim.Adam([{"params": rounding, "lr": self.weight_lr}, {"params": gains, "lr": self.range_lr}])
        cosine = lambda s: 0.5 * (1 + math.cos(math.pi * s / self.iterations))  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: 1.0, cosine])
        bar = tqdm(range(self.iterations), desc=f"unit {index + 1}/{len(self.units)} {unit.name}",
                   disable=not self.progress, leave=False)
        for step in bar:
            idx = torch.randint(0, len(targets), (self.batch_size,), device=targets.device)
            if self.activation_bits is not None:
                rec = self._multi_bit_loss(unit, inputs[idx], targets[idx])
            else:
                rec = _block_mse(self._run(unit, inputs[idx], 0, self.drop_prob), targets[idx])
            loss = rec
            beta = beta_schedule(step, self.iterations, self.warmup)
            if beta is not None and self._adarounds:
                loss = loss + self.round_weight * sum(a.regularizer(beta) for a in self._adarounds.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == self.iterations - 1:
                bar.set_postfix(rec=f"{rec.item():.4g}", loss=f"{loss.item():.4g}")
        logger.info("unit %d/%d %s: reconstruction loss %.4g after %d steps", index + 1, len(self.units), unit.name,
                    rec.item(), self.iterations)

    def _run(self, unit: Unit, x: torch.Tensor, level: Optional[int], drop: float = 0.0) -> torch.Tensor:
        self._level, self._drop = level, drop
        return unit.run(self.bound_model, x)

    def _multi_bit_loss(self, unit: Unit, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """PTMQ. Mixed-feature forward: every activation in the unit a random convex combination of
        its low/mid/high quantized values (with QDrop), against the float target. Group-wise
        distillation: the high forward against the float target, the mid and low forwards against
        the detached high output."""
        mixed = _block_mse(self._run(unit, x, None, self.drop_prob), target)
        high = self._run(unit, x, 2)
        teacher = high.detach()
        return (mixed + _block_mse(high, target) + _block_mse(self._run(unit, x, 1), teacher)
                + _block_mse(self._run(unit, x, 0), teacher))

    def _write_back(self, wrapper: QuantizerModuleWrapper, adaround: AdaRound) -> None:
        """Store the learned rounding in the float weight: round-to-nearest with the fixed range
        then reproduces it exactly (the BN factor is divided out where a BN is folded)."""
        self.rounding_values[wrapper.name] = adaround.rounding().detach()
        weight = adaround.hard_weight()
        with torch.no_grad():
            if wrapper.bn is not None:
                factor = wrapper.bn_scale().reshape([-1] + [1] * (weight.dim() - 1))
                weight = torch.where(factor == 0, wrapper.module.weight, weight / factor)
            wrapper.module.weight.copy_(weight)

    def calibration_record(self) -> CalibrationRecord:
        if not self.compressed:
            raise RuntimeError("ReconstructionQuantizer: call compress() before exporting")
        return super().calibration_record()
