"""Training data: the `--data` sources as tf.data pipelines (`text`: sentences of a
language model; `parallel`: a translation's sentence pairs), the subword tokenizer
(`tokenizer`), and the built-in corpus in `bible/` with its builder (`bible_corpus`)."""
