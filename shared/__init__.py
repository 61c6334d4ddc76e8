"""The protocol the cloud and the edge agent speak: topics, messages, signing, errors, tensors."""
