"""The reference model's other uses: example selection (``selection``) and the cache of its embeddings
(``cache``)."""
