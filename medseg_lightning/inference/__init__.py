"""Inference: model bundles on disk (``bundle``), the folded inference copy of a network, the predictor that
segments NIfTI/DICOM/2D inputs, instance detections and their outputs, post-processing and ONNX export."""
