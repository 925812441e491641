"""Data for sct: in-memory arrays (pipelines.arrays), WebDataset shards on disk or S3 (pipelines.shards,
pipelines.stream, pipelines.s3), VAE latent encoding (pipelines.encode), a read benchmark (pipelines.bench),
and what sct.train needs from any `data:` config (pipelines.data). Imports nothing itself, so that
`python -m pipelines.<tool>` runs each tool's module once."""
