"""imagemill's latent-diffusion trainer (`trainer ...`). No module here imports Apache
Beam (`tests/test_layers.py`).

`model.py` the denoiser and its presets, `flow.py` the rectified-flow objective and
sampler, `data.py` the data loaders, `cache.py` the latent cache, `components.py` the
frozen VAE and text encoder, `train.py` the training loop, `checkpoint.py` and
`resume.py` checkpoints and the resume policy, `export.py`/`pipeline.py` the diffusers
pipeline, `bench.py` the throughput benchmark, `cli.py` the command line;
`lora/`, `lora_data.py`, `lora_report.py` the LoRA trainer; `testing/` the demo and test
aids (tiny offline components, labelled shape images)."""
