//! Seeded random inputs for tests, benches and demos.

use ndarray::{Array, Array2, Array4, Dimension, ShapeBuilder};
use ndarray_rand::RandomExt;
use ndarray_rand::rand::{Rng, SeedableRng, rngs::StdRng};
use ndarray_rand::rand_distr::{StandardNormal, Uniform};

use crate::shape::Shape;

/// A standard-normal tensor of any shape, from `seed`.
pub fn normal<Sh: ShapeBuilder>(shape: Sh, seed: u64) -> Array<f32, Sh::Dim>
where
    Sh::Dim: Dimension,
{
    let mut rng = StdRng::seed_from_u64(seed);
    Array::random_using(shape, StandardNormal, &mut rng)
}

/// Q, K and V with standard-normal entries for `shape`.
pub fn qkv(shape: &Shape, seed: u64) -> (Array4<f32>, Array4<f32>, Array4<f32>) {
    (
        normal(shape.q_dims(), seed),
        normal(shape.kv_dims(), seed.wrapping_add(1)),
        normal(shape.kv_dims(), seed.wrapping_add(2)),
    )
}

/// A boolean tensor where each entry is `true` with probability `keep`.
pub fn mask<Sh: ShapeBuilder>(shape: Sh, keep: f64, seed: u64) -> Array<bool, Sh::Dim>
where
    Sh::Dim: Dimension,
{
    let mut rng = StdRng::seed_from_u64(seed);
    let u = Array::<f64, _>::random_using(shape, Uniform::new(0.0, 1.0).unwrap(), &mut rng);
    u.mapv(|x| x < keep)
}

/// A key-padding mask `[batch, n_k]`: batch entry `b` keeps a random prefix of at least one key.
pub fn key_padding(batch: usize, n_k: usize, seed: u64) -> Array2<bool> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut m = Array2::from_elem((batch, n_k), false);
    for mut row in m.rows_mut() {
        let len = rng.random_range(1..=n_k);
        row.slice_mut(ndarray::s![..len]).fill(true);
    }
    m
}

/// An additive bias of any shape with standard-normal entries, and about `neg_inf` of them −∞.
pub fn bias<Sh>(shape: Sh, neg_inf: f64, seed: u64) -> Array<f32, Sh::Dim>
where
    Sh: ShapeBuilder + Clone,
    Sh::Dim: Dimension,
{
    let values: Array<f32, Sh::Dim> = normal(shape.clone(), seed);
    let holes = mask(shape, neg_inf, seed.wrapping_add(1));
    ndarray::Zip::from(&values)
        .and(&holes)
        .map_collect(|&v, &hole| if hole { f32::NEG_INFINITY } else { v })
}
