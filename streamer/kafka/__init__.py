"""Kafka I/O: the group consumer, the publisher, the offset checkpoint, client settings and
the embedded development broker."""
