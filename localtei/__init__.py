"""localtei: a TEI-compatible (`tei.v1` gRPC) embedding server on ONNX Runtime or PyTorch.

Run it the way text-embeddings-router is run::

    python -m localtei --model-id sentence-transformers/all-MiniLM-L6-v2 --port 8080 \\
        --prometheus-port 9100 --json-output

In-process API (the server's own code path, for baselines and scripts)::

    from localtei.model import load_model

    model = load_model("sentence-transformers/all-MiniLM-L6-v2")  # pooling=, dtype= optional
    vectors = model.embed(["a text", "another"], normalize=True)  # numpy (n, 384) float32

`load_model(model_id, pooling=None, dtype=None, *, revision=None, cache_dir=None,
device=None, backend="auto", threads=None, onnx_cache=None)` finds the model (a directory,
the Hugging Face cache offline, or a packaged model), loads it on ONNX Runtime (CPU) or
torch (see `localtei.model.load_model`) and raises `localtei.errors.StartupError` when it
cannot. The returned `Model` also offers `run(jobs)` (one padded forward pass over
`localtei.jobs.Job`s), `spec` (kind, pooling, labels, max_input_length), `tokenizer` (a
`localtei.tokenization.TextTokenizer`), `backend`, `device` and `dtype`.
`localtei.model.default_num_threads()` is the intra-op thread count the server uses.

Modules: cli (flags), settings (flags and LOCALTEI_* knobs), lookup (where the files are),
spec (what the model is), tokenization, jobs (the unit of work), model (loading, padding,
results), onnx_engine and torch_engine (forward pass and pooling), onnx_export (the ONNX
cache), batching (workers and queue), services (the `tei.v1` servicers), server (start-up,
health, reflection, shutdown), metrics (`te_*`; prometheus_client adds `_total` to
counters), logs.
"""

__version__ = "0.1.0"
