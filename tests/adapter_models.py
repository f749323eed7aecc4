"""Small real models for the adapter tests, trained for a few hundred steps on scikit-learn's 8x8
digits. Torch classes take no constructor arguments so that a state_dict plus
``model_class="adapter_models:Class"`` can rebuild them; Keras builders take a dtype so that a
float64 twin (same weights) can be checked against finite differences."""

from __future__ import annotations

import numpy

from robeval.data import load_dataset


def digits(split: str = "train", limit: int | None = None):
    ds = load_dataset("digits", split=split, limit=limit)
    return ds.x, ds.y


# ---------------------------------------------------------------------------------------------- PyTorch
try:
    import torch
    from torch import nn
except ImportError:  # the Keras tests do not need torch
    torch = None

if torch is not None:
    from robeval.training.torch import GroupSort, SpectralLinear

    class DigitsMLP(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    class DigitsCNN(nn.Sequential):
        """Conv + BN + LeakyReLU + MaxPool + Dropout + 'same' conv + Tanh + AvgPool + Sigmoid."""

        def __init__(self):
            super().__init__(
                nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1), nn.MaxPool2d(2), nn.Dropout(0.1),
                nn.Conv2d(8, 16, 3, padding="same"), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10))

    class DigitsResNet(nn.Module):
        """A residual block (Add) with a custom forward: converted through torch.export."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 8, 3, padding=1)
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d(2)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.relu(h + self.conv2(torch.relu(self.conv1(h))))
            return self.fc(torch.flatten(self.pool(h), 1))

    class NormalizedMLP(nn.Module):
        """Input normalisation (x - mean) / std inside the model, with buffers."""

        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.full((1, 1, 1, 1), 0.3))
            self.register_buffer("std", torch.full((1, 1, 1, 1), 0.4))
            self.net = DigitsMLP()

        def forward(self, x):
            return self.net((x - self.mean) / self.std)

    class SoftmaxMLP(nn.Sequential):
        def __init__(self):
            super().__init__(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.Softmax(dim=1))

    class LipschitzMLP(nn.Sequential):
        """robeval's own Lipschitz layers (converted through their export())."""

        def __init__(self):
            super().__init__(nn.Flatten(), SpectralLinear(64, 32), GroupSort(2), SpectralLinear(32, 10))

    TORCH_MODELS = {"mlp": DigitsMLP, "cnn": DigitsCNN, "resnet": DigitsResNet, "normalized": NormalizedMLP,
                    "softmax": SoftmaxMLP, "lipschitz": LipschitzMLP}

    def train_torch(name: str, steps: int = 200, seed: int = 0):
        """A TORCH_MODELS model trained with Adam on the digits training split, in eval mode."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small models: one thread is faster than two contended ones
        try:
            return _train_torch(name, steps if name != "lipschitz" else steps // 3, seed)
        finally:
            torch.set_num_threads(threads)

    def _train_torch(name, steps, seed):
        torch.manual_seed(seed)
        model = TORCH_MODELS[name]()
        x, y = digits("train")
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        gen = numpy.random.default_rng(seed)
        model.train()
        for _ in range(steps):
            idx = torch.as_tensor(gen.integers(0, len(x), 64))
            out = model(xt[idx])
            logits = out.clamp_min(1e-12).log() if name == "softmax" else out
            loss = nn.functional.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval()


# ---------------------------------------------------------------------------------------------- Keras
def keras_mlp(dtype: str = "float32"):
    import keras

    L = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1), dtype=dtype), L.Rescaling(2.0, -1.0, dtype=dtype), L.Flatten(dtype=dtype),
        L.Dense(32, activation="relu", dtype=dtype), L.Dropout(0.1, dtype=dtype), L.Dense(10, dtype=dtype)],
        name="mlp")


def keras_cnn(dtype: str = "float32"):
    """Conv2D 'same' stride 2 (asymmetric TF padding) + BN + MaxPool + GlobalAveragePooling2D + softmax."""
    import keras

    L = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1), dtype=dtype),
        L.Conv2D(16, 3, strides=2, padding="same", dtype=dtype), L.BatchNormalization(dtype=dtype),
        L.ReLU(dtype=dtype), L.Conv2D(16, 3, padding="same", activation="tanh", dtype=dtype),
        L.MaxPooling2D(2, dtype=dtype), L.GlobalAveragePooling2D(dtype=dtype),
        L.Dense(10, activation="softmax", dtype=dtype)], name="cnn")


def keras_residual(dtype: str = "float32"):
    """Functional graph with Add, then LeakyReLU (which TF graph mode gets wrong) and a Flatten of an
    8-channel map (the NHWC feature order that the conversion has to permute)."""
    import keras

    L = keras.layers
    inp = keras.Input((8, 8, 1), dtype=dtype)
    a = L.Conv2D(8, 3, padding="same", activation="relu", dtype=dtype)(inp)
    b = L.Conv2D(8, 3, padding="same", dtype=dtype)(a)
    h = L.LeakyReLU(0.1, dtype=dtype)(L.Add(dtype=dtype)([a, b]))
    h = L.AveragePooling2D(2, dtype=dtype)(h)
    out = L.Dense(10, dtype=dtype)(L.Flatten(dtype=dtype)(h))
    return keras.Model(inp, out, name="residual")


KERAS_MODELS = {"mlp": keras_mlp, "cnn": keras_cnn, "residual": keras_residual}


def train_keras(name: str, epochs: int = 10, seed: int = 0):
    """A KERAS_MODELS model fitted on the digits training split (~22 steps per epoch)."""
    import keras

    keras.utils.set_random_seed(seed)
    model = KERAS_MODELS[name]()
    x, y = digits("train")
    probs = name == "cnn"
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not probs))
    model.fit(x.transpose(0, 2, 3, 1), y, batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    return model


def keras_float64_twin(name: str, model):
    """The same model built in float64 with the same weights."""
    twin = KERAS_MODELS[name]("float64")
    twin.set_weights([w.astype(numpy.float64) for w in model.get_weights()])
    return twin
