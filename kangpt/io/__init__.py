"""What kangpt's parts read and write alike: folders written whole or not at all (``folders``), model
folders loaded with their tokenizer (``loading``), generation compiled (``generating``) and figures
drawn without a screen (``plotting``)."""
