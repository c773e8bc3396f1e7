def load_config_hf(model_name):
    raise NotImplementedError("cpu stub")


def load_state_dict_hf(model_name, device=None, dtype=None):
    raise NotImplementedError("cpu stub")
