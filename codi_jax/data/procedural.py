"""Procedural scenes with exact depth: a CPU stand-in for depth-to-image data.

Why: the offline photographs have a real depth map for one photo only, and depth datasets
(NYU v2) are not available offline. A scene rendered here from a seed gives an (image, depth)
pair whose depth is exact and whose occlusions are real, so the depth-conditioned model has to
learn geometry, not texture. Colours are photographic: every surface is textured with the clean
input image (a random window of it, mirrored at its borders).

Scene (all in one orthographic camera; screen coordinates u (right), v (down) span [-1, 1] over
the image; depth z is the distance from the camera, same units):
  layer 0     a background plane z = z0 + a u + b v covering the whole frame, far away;
  layers 1..  1 to `max_objects` objects nearer than the background: spheres (z = z_c - sqrt(r^2 - d^2)
              on their disc) and boxes (rectangles on a tilted plane z = z_c + a (u - u_c) + b (v - v_c));
              unused layers are inactive.
Each pixel shows the nearest active layer covering it (a z-buffer). Shading is Lambertian with a
random light direction and an ambient term, from the exact surface normals.

The scene is a dict of tensors (`sample_scene`), so a test can also write one by hand and check
`render_scene` against it.
"""

from __future__ import annotations

import math

import ml_collections
import tensorflow as tf

from codi_jax.data.degradations import mirror_index, split_seed, uniform

SPHERE, BOX, PLANE = 0, 1, 2


@tf.autograph.experimental.do_not_convert
def sample_scene(seed: tf.Tensor, config: ml_collections.ConfigDict, size: int) -> dict[str, tf.Tensor]:
    """A random scene with `1 + max_objects` layers (layer 0 = background plane).

    Keys (L = layers): kind int32 (L,) SPHERE/BOX/PLANE; active bool (L,); center (L, 2) (u, v);
    extent (L, 2) (sphere radius = extent[:, 0]; box half-width, half-height); depth (L,) the
    depth at the centre; slope (L, 2) (dz/du, dz/dv) of boxes and planes; tex_offset (L, 2) the
    texture window's centre in input pixels (x, y); tex_scale (L,) input pixels per output pixel;
    light (3,) unit vector towards the light (z towards the scene, so its z is negative).
    """
    count = int(config.max_objects)
    near, far = (float(v) for v in config.depth_range)
    split_depth = near + 0.7 * (far - near)
    tilt = float(config.max_tilt)
    seeds = split_seed(seed, 11)

    num_objects = tf.random.stateless_uniform([], seeds[0], 1, count + 1, tf.int32)
    objects_active = tf.range(count) < num_objects
    objects_kind = tf.where(uniform(seeds[1], 0.0, 1.0, [count]) < float(config.sphere_prob), SPHERE, BOX)
    objects_extent = uniform(seeds[2], *config.size_range, [count, 2])
    objects_center = uniform(seeds[3], -0.9, 0.9, [count, 2])
    objects_depth = uniform(seeds[4], near, split_depth, [count])
    objects_slope = uniform(seeds[5], -tilt, tilt, [count, 2])
    background_depth = uniform(seeds[6], split_depth + 0.1 * (far - split_depth), far, [1])
    background_slope = uniform(seeds[7], -0.3 * tilt, 0.3 * tilt, [1, 2])

    light_xy = uniform(seeds[8], -1.0, 1.0, [2])
    light = tf.concat([light_xy, [-1.0]], 0)
    return {
        "kind": tf.concat([[PLANE], objects_kind], 0),
        "active": tf.concat([[True], objects_active], 0),
        "center": tf.concat([tf.zeros([1, 2]), objects_center], 0),
        "extent": tf.concat([tf.ones([1, 2]), objects_extent], 0),
        "depth": tf.concat([background_depth, objects_depth], 0),
        "slope": tf.concat([background_slope, objects_slope], 0),
        "tex_offset": uniform(seeds[9], 0.0, float(size), [count + 1, 2]),
        "tex_scale": uniform(seeds[10], 0.5, 1.5, [count + 1]),
        "light": light / tf.norm(light),
    }


def _sample_bilinear(texture: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """Bilinear lookup of an HxWxC texture at pixel coordinates (x, y) (pixel centres at +0.5),
    mirrored beyond the borders so that any coordinate is valid."""
    height, width = tf.shape(texture)[0], tf.shape(texture)[1]
    x, y = x - 0.5, y - 0.5
    x0, y0 = tf.floor(x), tf.floor(y)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)

    def at(dx: int, dy: int) -> tf.Tensor:
        indices = tf.stack([mirror_index(y0 + dy, height), mirror_index(x0 + dx, width)], axis=-1)
        return tf.gather_nd(texture, indices)

    top = at(0, 0) * (1.0 - wx) + at(1, 0) * wx
    bottom = at(0, 1) * (1.0 - wx) + at(1, 1) * wx
    return top * (1.0 - wy) + bottom * wy


@tf.autograph.experimental.do_not_convert
def render_scene(
    texture: tf.Tensor, scene: dict[str, tf.Tensor], size: int, ambient: float = 0.35
) -> tuple[tf.Tensor, tf.Tensor]:
    """Renders `scene` at size x size: (image (S, S, 3) in [-1, 1], depth (S, S) > 0).

    `texture` is an image in [-1, 1] (the clean input). Pixels no active layer covers (only
    possible in hand-made scenes without a plane) are black at the farthest rendered depth.
    """
    coords = (tf.range(size, dtype=tf.float32) + 0.5) / size * 2.0 - 1.0
    v, u = tf.meshgrid(coords, coords, indexing="ij")  # (S, S): v down rows, u along columns
    u, v = u[None], v[None]  # broadcast against layers (L, 1, 1)

    def per_layer(values: tf.Tensor) -> tf.Tensor:
        return tf.reshape(values, [-1, 1, 1])

    center_u, center_v = per_layer(scene["center"][:, 0]), per_layer(scene["center"][:, 1])
    extent_u, extent_v = per_layer(scene["extent"][:, 0]), per_layer(scene["extent"][:, 1])
    slope_u, slope_v = per_layer(scene["slope"][:, 0]), per_layer(scene["slope"][:, 1])
    depth_center = per_layer(scene["depth"])
    kind = per_layer(scene["kind"])
    du, dv = u - center_u, v - center_v

    # Spheres: the visible hemisphere over the disc of radius extent_u.
    radius = extent_u
    rho2 = (du * du + dv * dv) / (radius * radius)
    sphere_cover = rho2 < 1.0
    bulge = tf.sqrt(tf.maximum(1.0 - rho2, 0.0))
    sphere_depth = depth_center - radius * bulge
    sphere_normal = tf.stack([du / radius, dv / radius, -bulge], axis=-1)

    # Boxes and planes: z = z_c + a du + b dv; normal along (a, b, -1).
    plane_depth = depth_center + slope_u * du + slope_v * dv
    plane_normal = (
        tf.stack([slope_u, slope_v, -tf.ones_like(slope_u)], axis=-1)
        / tf.sqrt(slope_u * slope_u + slope_v * slope_v + 1.0)[..., None]
    )
    plane_normal = tf.broadcast_to(plane_normal, tf.shape(sphere_normal))
    box_cover = (tf.abs(du) <= extent_u) & (tf.abs(dv) <= extent_v)

    is_sphere, is_plane = kind == SPHERE, kind == PLANE
    covered = tf.where(is_sphere, sphere_cover, tf.where(is_plane, tf.ones_like(box_cover), box_cover))
    covered &= per_layer(scene["active"])
    depth = tf.where(is_sphere, sphere_depth, plane_depth)
    normal = tf.where(is_sphere[..., None], sphere_normal, plane_normal)

    # z-buffer: the nearest covering layer wins.
    masked_depth = tf.where(covered, depth, math.inf)
    nearest = tf.argmin(masked_depth, axis=0, output_type=tf.int32)  # (S, S)
    visible_depth = tf.reduce_min(masked_depth, axis=0)
    any_cover = tf.reduce_any(covered, axis=0)
    farthest = tf.reduce_max(tf.where(tf.math.is_finite(visible_depth), visible_depth, 0.0))
    visible_depth = tf.where(any_cover, visible_depth, farthest)

    def pick(values: tf.Tensor) -> tf.Tensor:
        """values (L, S, S, ...) -> (S, S, ...) of the visible layer."""
        return tf.gather(tf.transpose(values, [1, 2, 0, *range(3, values.shape.rank)]), nearest, batch_dims=2)

    # Texture: a window of the input image around tex_offset, scaled by tex_scale.
    half = size / 2.0
    tex_x = per_layer(scene["tex_offset"][:, 0]) + du * half * per_layer(scene["tex_scale"])
    tex_y = per_layer(scene["tex_offset"][:, 1]) + dv * half * per_layer(scene["tex_scale"])
    albedo = _sample_bilinear((texture + 1.0) / 2.0, pick(tex_x), pick(tex_y))
    lambert = tf.maximum(tf.reduce_sum(pick(normal) * scene["light"], axis=-1), 0.0)
    shading = ambient + (1.0 - ambient) * lambert
    rgb = tf.where(any_cover[..., None], albedo * shading[..., None], 0.0)
    image = tf.clip_by_value(rgb * 2.0 - 1.0, -1.0, 1.0)
    return tf.ensure_shape(image, [size, size, 3]), tf.ensure_shape(visible_depth, [size, size])


@tf.autograph.experimental.do_not_convert
def render_procedural(
    texture: tf.Tensor, seed: tf.Tensor, config: ml_collections.ConfigDict
) -> tuple[tf.Tensor, tf.Tensor]:
    """A random scene textured with `texture` (S, S, 3) in [-1, 1]: (image, exact depth (S, S))."""
    size = int(texture.shape[0])
    scene = sample_scene(seed, config, size)
    return render_scene(texture, scene, size, float(config.ambient))
