"""mixq: config-list quantization for PyTorch with real mixed-precision inference engines."""
from .compressor import Quantizer, load_calibration_config, save_calibration_config
from .quantizers import NaiveQuantizer, ObserverQuantizer, QAT_Quantizer
from .version import __version__

__all__ = ["Quantizer", "QAT_Quantizer", "NaiveQuantizer", "ObserverQuantizer", "load_calibration_config",
           "save_calibration_config", "__version__"]
