"""The wire: topics, envelopes and signing, MQTT link, codecs, socket byte counters."""
