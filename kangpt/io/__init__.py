"""What kangpt's parts read and write alike: model folders loaded with their tokenizer (``loading``)
and figures drawn without a screen (``plotting``)."""
