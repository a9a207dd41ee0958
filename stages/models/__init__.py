"""The models the curation stages run (CLIP, NudeNet, embedding heads, the
captioning VLM): loading and batched inference in plain PyTorch/ONNX, with no
Apache Beam import. The stage modules wrap them in thin RunInference
ModelHandlers."""
