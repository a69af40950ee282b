from pockengine.capture.export import Captured, capture, normalize_batch

__all__ = ["Captured", "capture", "normalize_batch"]
