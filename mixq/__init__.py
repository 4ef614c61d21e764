"""mixq: config-list quantization for PyTorch with real mixed-precision inference engines."""
from .compressor import Quantizer, load_calibration_config, save_calibration_config
from .quantizers import NaiveQuantizer, ObserverQuantizer, QAT_Quantizer

__version__ = "0.1.0"
__all__ = ["Quantizer", "QAT_Quantizer", "NaiveQuantizer", "ObserverQuantizer", "load_calibration_config",
           "save_calibration_config", "__version__"]
