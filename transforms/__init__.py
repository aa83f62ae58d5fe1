"""Beam transforms, one file per concern (Kafka I/O, decoding, anonymization, ...)."""
