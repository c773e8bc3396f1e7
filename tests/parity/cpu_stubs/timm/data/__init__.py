from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor


def resolve_model_data_config(model):
    return dict(model.pretrained_cfg)


def create_transform(input_size, interpolation="bicubic", mean=None, std=None, crop_pct=1.0, is_training=False, **kw):
    size = input_size[-1]
    scale = int(size / crop_pct)
    return Compose([Resize(scale, interpolation=InterpolationMode.BICUBIC), CenterCrop(size), ToTensor(),
                    Normalize(mean, std)])
