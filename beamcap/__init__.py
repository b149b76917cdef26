"""beamcap: Apache Beam transforms that caption images with Hugging Face image-to-text models."""

from beamcap.config import CaptionConfig
from beamcap.demo import demo_model_path
from beamcap.images import ImageLoadError
from beamcap.metrics import METRICS_NAMESPACE
from beamcap.retention import KeepMode, simhash_fingerprint
from beamcap.samples import SampleError
from beamcap.transform import CaptionImages, CaptionResult, UnsupportedRunnerError

__version__ = "0.1.0"

__all__ = [
    "CaptionConfig",
    "CaptionImages",
    "CaptionResult",
    "ImageLoadError",
    "KeepMode",
    "METRICS_NAMESPACE",
    "SampleError",
    "UnsupportedRunnerError",
    "demo_model_path",
    "simhash_fingerprint",
]
