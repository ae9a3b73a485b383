"""atr-jax: language-based audio retrieval in JAX/Flax. `atr_jax.load(workdir)` gives a trained model to Python;
importing the package loads nothing heavy (JAX, TensorFlow and the model load inside `load`)."""


def load(workdir):
  """The trained model of a training workdir, for embedding and searching audio with text (and audio).

  `workdir` is a folder that `python -m atr_jax.main` trained (e.g. "runs/demo"): its best checkpoint (by the
  validation metric) and the config.json saved beside it are restored. The returned `atr_jax.api.Model` gives
  exactly the embeddings of `python -m atr_jax.retrieve`, `python -m atr_jax.zeroshot` and evaluation:

  - `model.embed_text(["a dog barks", ...])` -> float32 [N, D] unit rows;
  - `model.embed_audio(["a.wav", "b.flac", ...])` -> [N, D]: files in any format soundfile reads, any length; or
    float arrays of samples with their rate: `model.embed_audio([samples], sample_rate=44100)`; batched, with a
    progress bar on long lists;
  - `model.similarity(a, b)` -> cosine similarities of two sets of embeddings ([N, M]);
  - `model.search("a dog barks", "runs/demo_index", top_k=5)` -> [(file name, score), ...] best first, from an index
    folder written by `python -m atr_jax.retrieve index`, or from a pair (embeddings, names):
    `model.search("rain", (model.embed_audio(files), files))`.

  Errors name the file or argument at fault (a missing or unreadable file, an array without `sample_rate`, an
  empty list). Example:

    import atr_jax
    model = atr_jax.load("runs/demo")
    files = ["clips/dog.wav", "clips/rain.flac"]
    scores = model.similarity(model.embed_text(["a dog barks"]), model.embed_audio(files))  # [1, 2]
  """
  from atr_jax import api  # Here: JAX, TensorFlow and the model code load on first use, not on `import atr_jax`.

  return api.Model(workdir)
