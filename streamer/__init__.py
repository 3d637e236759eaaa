"""streamer: Kafka-native streaming inference for Hugging Face transformer models."""

__version__ = "0.1.0"
