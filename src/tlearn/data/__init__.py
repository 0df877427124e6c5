"""Files -> dataset -> decoded tensors: layouts and splits, decoding, batching."""
from tlearn.data.decode import DecodeError, decode_bytes, is_image_path, load_image
from tlearn.data.layout import Dataset, DatasetError, Sample, find_dataset

__all__ = ["Dataset", "DatasetError", "DecodeError", "Sample", "decode_bytes", "find_dataset", "is_image_path",
           "load_image"]
