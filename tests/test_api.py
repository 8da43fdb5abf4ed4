"""The public surface: ``import funcnet as fn`` exposes what the README promises."""

import funcnet as fn


def test_public_names_import():
    for name in fn.__all__:
        assert hasattr(fn, name), name
    for op in fn.ops.__all__:
        assert callable(getattr(fn.ops, op)), op


def test_every_public_layer_class_is_exported_and_a_layer():
    import inspect

    from funcnet import layers

    public = {
        n
        for n, obj in vars(layers).items()
        if inspect.isclass(obj) and issubclass(obj, layers.Layer) and not n.startswith("_")
    }
    assert public <= set(fn.__all__)
    assert {
        "Dense",
        "Conv",
        "LocallyConnected",
        "MaxPool",
        "AvgPool",
        "L2Pool",
        "FeatureL2Pool",
        "FeatureMaxPool",
        "Sigmoid",
        "Tanh",
        "ReLU",
        "Activation",
        "Softmax",
        "LogSoftmax",
        "Flatten",
    } <= public
