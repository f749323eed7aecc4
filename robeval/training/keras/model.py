"""``RobustModel``: a ``keras.Model`` wrapping a base model whose ``train_step`` minimises a robust
objective, so ``model.compile(...); model.fit(...)`` trains it as Neural Structured Learning's
``AdversarialRegularization`` does.

The base class keeps the Keras bookkeeping (unpacking data, the gradient step, loss tracking,
compiled metrics on the clean outputs); a subclass only writes ``objective``. The base model is the
thing to save, certify and deploy (``wrapper.base_model``); the wrapper also saves as a whole.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ...errors import InvalidParameterError


def sparse_labels(y, num_classes: int) -> tf.Tensor:
    """Class indices (N,) int32 from indices (N,) / (N, 1) or one-hot (N, K) labels."""
    y = tf.convert_to_tensor(y)
    if y.shape.rank == 2 and y.shape[-1] == num_classes and num_classes > 1:
        return tf.cast(tf.argmax(y, axis=1), tf.int32)
    return tf.cast(tf.reshape(y, (-1,)), tf.int32)


def cross_entropy(y, logits) -> tf.Tensor:
    """Mean softmax cross-entropy of logits (N, K) with class-index or one-hot labels."""
    labels = sparse_labels(y, logits.shape[-1])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


class RobustModel(keras.Model):
    """Template for robust-training wrappers: ``objective(x, y, sample_weight, training)`` returns
    (clean outputs, total loss); everything else is Keras's usual fit/evaluate machinery.

    Args:
        base_model: the network being trained (any keras.Model or layer mapping x to logits).
    """

    def __init__(self, base_model, **kwargs):
        super().__init__(**kwargs)
        if not callable(base_model):
            raise InvalidParameterError(f"base_model must be a keras.Model, got {type(base_model).__name__}")
        self.base_model = base_model

    def call(self, inputs, training=None):
        return self.base_model(inputs, training=training)

    # -- pieces for subclasses
    def labeled_loss(self, y, y_pred, sample_weight=None) -> tf.Tensor:
        """The loss given to ``compile`` (without regularisation terms); cross-entropy on logits if none."""
        compiled = getattr(self, "_compile_loss", None)
        if compiled is not None:
            value = compiled(y, y_pred, sample_weight)
            if value is not None:
                return value
        return cross_entropy(y, y_pred)

    def regularization_loss(self) -> tf.Tensor:
        """Sum of the layers' added losses (weight and activity regularisers), 0 without any."""
        terms = [tf.reduce_sum(loss) for loss in self.losses]
        return tf.add_n(terms) if terms else tf.constant(0.0)

    def objective(self, x, y, sample_weight=None, training=True) -> tuple[tf.Tensor, tf.Tensor]:
        """(outputs on the clean x, the scalar loss to minimise). Here the plain loss; subclasses add
        their robust term."""
        y_pred = self(x, training=training)
        return y_pred, self.labeled_loss(y, y_pred, sample_weight) + self.regularization_loss()

    # -- Keras hooks
    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred, loss = self.objective(x, y, sample_weight, training=True)
            scaled = self.optimizer.scale_loss(loss) if hasattr(self.optimizer, "scale_loss") else loss
        weights = self.trainable_weights
        grads = tape.gradient(scaled, weights)
        self.optimizer.apply_gradients(zip(grads, weights))
        return self._metrics_after(loss, x, y, y_pred, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred, loss = self.objective(x, y, sample_weight, training=False)
        return self._metrics_after(loss, x, y, y_pred, sample_weight)

    def _metrics_after(self, loss, x, y, y_pred, sample_weight):
        tracker = getattr(self, "_loss_tracker", None)
        if tracker is not None:
            tracker.update_state(loss, sample_weight=tf.shape(x)[0])
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    # -- saving
    def get_config(self):
        return {"name": self.name, "base_model": keras.saving.serialize_keras_object(self.base_model)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        base = keras.saving.deserialize_keras_object(config.pop("base_model"), custom_objects=custom_objects)
        return cls(base, **config)
