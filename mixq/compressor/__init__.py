"""The quantization framework: config list, module wrappers, fake-quant maths, calibration export."""
from .calibration import (CalibrationConfig, CalibrationError, load_calibration_config, save_calibration_config,
                          validate_calibration_config)
from .calibration_record import CalibrationRecord, LayerCalibration, QuantParams
from .config import ConfigError, LayerQuantConfig
from .fake_quant import QuantGrad, fake_quantize, qparams_from_range, quant_range
from .observers import (MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, NonFiniteTensorError,
                        PercentileObserver)
from .quantizer import Quantizer
from .scheme import Scheme
from .wrapper import QuantizerModuleWrapper, unwrapped_copy

__all__ = ["Quantizer", "QuantGrad", "QuantizerModuleWrapper", "unwrapped_copy", "ConfigError", "LayerQuantConfig",
           "CalibrationConfig", "CalibrationError", "load_calibration_config", "save_calibration_config",
           "validate_calibration_config", "fake_quantize", "qparams_from_range", "quant_range",
           "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver",
           "NonFiniteTensorError", "CalibrationRecord", "LayerCalibration", "QuantParams", "Scheme"]
