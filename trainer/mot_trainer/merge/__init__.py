"""`mot-train merge`: merge checkpoints in weight space, streaming tensor by tensor.

Inputs must be complete checkpoints (a valid mot-manifest.json); a user's own model folders without
one are merged only with --allow-unmanifested-inputs, and then the sha256 of every file used from them
is recorded in the output's manifest. Inputs (and the base) must agree on tie_word_embeddings.
Tensors are read by header offset and merged in fp32 in slices of at most SLICE_ELEMENTS elements
(whole tensors for methods that need per-tensor statistics), so peak memory stays near a few slices
whatever the model size and the number of inputs. With more than 2 CPUs the slices are merged on a
few threads (`--threads`). The output is written as shards as it goes, then the manifest last.
s3:// inputs are downloaded (and verified) and an s3:// output is staged under $TMPDIR.

Modules: cli (the command: options, validation, the run), inputs (fetching and checking the inputs),
merger (the threaded merger) and cpus (its default thread count), reader and writer (safetensors
I/O), workspace (scratch tensors), and one module per merge method: average, task_arithmetic, ties,
dare (each with NEEDS_BASE, ELEMENTWISE and merge()).
"""
