"""Decoded tensors -> features: frozen-backbone extraction and its on-disk cache."""
from tlearn.features.cache import FeatureCache, default_cache_dir
from tlearn.features.extract import Features, extract_features, feature_key

__all__ = ["FeatureCache", "Features", "default_cache_dir", "extract_features", "feature_key"]
