"""What a training run leaves for use: the SavedModels of the language model (`lm`) and
the translator (`nmt`), their atomic write (`export`), and the model of a run directory
read back from its checkpoint (`trained_model`)."""
