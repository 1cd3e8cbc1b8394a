"""A trained model put to use: loaded back from a checkpoint (`load`) and exported for other runtimes (`export`)."""
