"""AlexNet's own augmentation, found by name from `data.augment` and snapshotted with each run.

`pca_lighting` is the paper's "fancy PCA" colour augmentation (Krizhevsky et al. 2012, Sec. 4.1): to every
pixel of a training image add [p1, p2, p3] [a1 l1, a2 l2, a3 l3]^T, where p_i, l_i are the eigenvectors and
eigenvalues of the 3x3 covariance of ImageNet RGB values and a_i ~ N(0, 0.1) is drawn once per image.
"""

import tensorflow as tf

from shared.errors import UserError

# ImageNet RGB PCA on the 0-1 scale, as fb.resnet.torch (and timm, MXNet, GluonCV) use it. The columns of
# IMAGENET_EIGVEC are the eigenvectors (rows are R, G, B), in the order of IMAGENET_EIGVAL.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
PIXEL_SCALE = 255.0  # the pipeline augments 0-255 floats: eigenvalues x255 (MXNet's 55.46, 4.794, 1.148)


def pca_lighting(std: float = 0.1):
    """Return image -> image (float32 HxWx3, 0-255 scale) adding eigvec @ (alpha * eigval * 255) to every
    pixel, alpha ~ N(0, std) per image. The result is not clipped (fb.resnet.torch does not clip either);
    std=0 returns the image unchanged. An image whose channel count the graph does not know is taken as RGB
    (checked when it runs); one known to have another count is a UserError when the pipeline is built."""
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    eigval = tf.constant(IMAGENET_EIGVAL, tf.float32) * PIXEL_SCALE
    eigvec = tf.constant(IMAGENET_EIGVEC, tf.float32)

    def lighting(image):
        channels = image.shape[-1]
        if channels is None:  # a decoder that leaves the count to run time: the pipeline gives data.channels
            image = tf.ensure_shape(image, image.shape[:-1].concatenate([3]))
        elif channels != 3:
            raise UserError(f"data.augment pca_lighting needs RGB images, and data.channels is {channels}; set "
                            f"data.channels: 3 or leave pca_lighting out")
        if std == 0:
            return image
        alpha = tf.random.normal([3], stddev=std, dtype=tf.float32)
        shift = tf.linalg.matvec(eigvec, alpha * eigval)  # one RGB offset for the whole image
        return image + shift
    return lighting
