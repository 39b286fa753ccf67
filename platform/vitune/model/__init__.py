"""The model: image preprocessing, vision tower, projector, the VLM, the decode loop, model folders."""
