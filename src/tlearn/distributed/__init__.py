"""Jobs beyond one machine on Ray Data (the `ray` extra), built on the same Predictor and pixel pipeline.

Importing this package does not import Ray: the single-machine Parquet job and the CLI's start-up need none.
"""
from tlearn.distributed.extraction import RayExtraction, extract_features_ray
from tlearn.distributed.jobs import predict_to_parquet

__all__ = ["RayExtraction", "extract_features_ray", "predict_to_parquet"]
