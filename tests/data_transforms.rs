//! Transforms against known outputs: identities, exact crop windows, bilinear values worked out
//! by hand (PyTorch `align_corners=False` semantics), rotations and colour jitter.

use kiln::Error;
use kiln::data::{
    CenterCrop, ColorJitter, Compose, Denormalize, HorizontalFlip, Image, Normalize, RandomCrop, RandomHorizontalFlip,
    RandomRotation, Resize, ResizeMode, ToFloat, Transform, rotate, sample_rng,
};
use kiln::rng::Rng;

/// A `c x h x w` image whose value at (c, y, x) is `100 c + 10 y + x`.
fn coded(c: usize, h: usize, w: usize) -> Image {
    let mut data = Vec::new();
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                data.push((100 * ch + 10 * y + x) as f32);
            }
        }
    }
    Image::new(c, h, w, data).unwrap()
}

fn rng() -> Rng {
    Rng::new(12345)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "value {i}: got {g}, want {w}\n{got:?}");
    }
}

#[test]
fn flip_twice_is_identity() {
    let img = coded(3, 4, 5);
    let once = HorizontalFlip.apply(img.clone(), &mut rng()).unwrap();
    assert_eq!(once.pixel(1, 2, 0), img.pixel(1, 2, 4));
    assert_ne!(once, img);
    let twice = HorizontalFlip.apply(once, &mut rng()).unwrap();
    assert_eq!(twice, img);
    // p = 1 always flips, p = 0 never does.
    let always = RandomHorizontalFlip::new(1.0);
    let never = RandomHorizontalFlip::new(0.0);
    for s in 0..10 {
        let mut r = Rng::new(s);
        assert_eq!(always.apply(img.clone(), &mut r).unwrap().pixel(0, 0, 0), 4.0);
        assert_eq!(never.apply(img.clone(), &mut r).unwrap(), img);
    }
    // p = 0.5 flips some and not others.
    let half = RandomHorizontalFlip::new(0.5);
    let flipped = (0..100).filter(|&s| half.apply(img.clone(), &mut Rng::new(s)).unwrap() != img).count();
    assert!((30..=70).contains(&flipped), "{flipped} of 100 flipped");
}

#[test]
fn normalise_then_denormalise_round_trips() {
    let img = ToFloat.apply(coded(3, 4, 4), &mut rng()).unwrap();
    let mean = [0.4914, 0.4822, 0.4465];
    let std = [0.2470, 0.2435, 0.2616];
    let n = Normalize::new(&mean, &std).unwrap();
    let normed = n.apply(img.clone(), &mut rng()).unwrap();
    // (x - m) / s at (c=2, y=1, x=3): x = 213 / 255.
    let want = (213.0 / 255.0 - 0.4465) / 0.2616;
    assert!((normed.pixel(2, 1, 3) - want).abs() < 1e-6);
    let back = n.inverse().apply(normed.clone(), &mut rng()).unwrap();
    assert_close(back.data(), img.data(), 1e-6);
    let back2 = Denormalize::new(&mean, &std).unwrap().apply(normed, &mut rng()).unwrap();
    assert_eq!(back, back2);
}

#[test]
fn centre_crop_windows() {
    // 5x6 -> 3x4: top = round(1.0) = 1, left = round(1.0) = 1.
    let out = CenterCrop::new(3, 4).apply(coded(1, 5, 6), &mut rng()).unwrap();
    assert_eq!(out.data(), &[11., 12., 13., 14., 21., 22., 23., 24., 31., 32., 33., 34.]);
    // 4x4 -> 1x1: top = left = round(1.5) = 2 (half to even, as torchvision).
    let out = CenterCrop::new(1, 1).apply(coded(2, 4, 4), &mut rng()).unwrap();
    assert_eq!(out.data(), &[22., 122.]);
    // 2x2 -> 3x4: padded with zeros, (4 - 2) // 2 = 1 column and (3 - 2) // 2 = 0 rows before.
    let out = CenterCrop::new(3, 4).apply(coded(1, 2, 2), &mut rng()).unwrap();
    assert_eq!(out.data(), &[0., 0., 1., 0., 0., 10., 11., 0., 0., 0., 0., 0.]);
}

#[test]
fn random_crop_with_padding_takes_windows_of_the_padded_image() {
    let img = coded(2, 6, 6);
    let crop = RandomCrop::new(6, 6).padding(2);
    let mut offsets = std::collections::BTreeSet::new();
    for s in 0..400 {
        let out = crop.apply(img.clone(), &mut Rng::new(s)).unwrap();
        assert_eq!(out.shape(), [2, 6, 6]);
        // Find the offset: the window's (0, 0) is image (dy, dx) for dy, dx in -2..=2.
        let found = (-2i32..=2).flat_map(|dy| (-2i32..=2).map(move |dx| (dy, dx))).find(|&(dy, dx)| {
            (0..2).all(|c| {
                (0..6).all(|y| {
                    (0..6).all(|x| {
                        let (sy, sx) = (y as i32 + dy, x as i32 + dx);
                        let want = if (0..6).contains(&sy) && (0..6).contains(&sx) {
                            img.pixel(c, sy as usize, sx as usize)
                        } else {
                            0.0
                        };
                        out.pixel(c, y, x) == want
                    })
                })
            })
        });
        offsets.insert(found.expect("the crop is a window of the zero-padded image"));
    }
    assert_eq!(offsets.len(), 25, "every offset in -2..=2 x -2..=2 occurs");

    // An exact window: with padding 1 and offset (0, 0) the top row and left column are fill.
    let exact = RandomCrop::new(3, 3).padding(1).fill(-1.0);
    let want_first = [-1., -1., -1., -1., 0., 1., -1., 10., 11.];
    let hit = (0..200).any(|s| exact.apply(coded(1, 3, 3), &mut Rng::new(s)).unwrap().data() == want_first);
    assert!(hit, "offset (-1, -1) never drawn");

    // Same generator, same window.
    let a = crop.apply(img.clone(), &mut Rng::new(9)).unwrap();
    let b = crop.apply(img.clone(), &mut Rng::new(9)).unwrap();
    assert_eq!(a, b);

    // Too small even after padding.
    let err = RandomCrop::new(32, 32).padding(1).apply(coded(1, 28, 28), &mut rng()).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    assert!(err.to_string().contains("1x28x28"), "{err}");
}

#[test]
fn resize_of_a_gradient_matches_hand_computed_bilinear_values() {
    // Row [0, 10, 20, 30] to 8 columns: scale 0.5, source x = (d + 0.5) * 0.5 - 0.5 =
    // -0.25 (clamped to 0), 0.25, 0.75, ..., 3.25 (past the last pixel: repeats it).
    let row = Image::new(1, 1, 4, vec![0., 10., 20., 30.]).unwrap();
    let up = Resize::new(1, 8).apply(row.clone(), &mut rng()).unwrap();
    assert_close(up.data(), &[0., 2.5, 7.5, 12.5, 17.5, 22.5, 27.5, 30.], 1e-5);
    // Down to 2: source x = 0.5 and 2.5.
    let down = Resize::new(1, 2).apply(row, &mut rng()).unwrap();
    assert_close(down.data(), &[5., 25.], 1e-5);

    // 2-D: value 10 y + x on 3x3, to 2x2: source coordinate 0.25 and 1.75 on each axis,
    // so the output is 10 * sy + sx exactly (bilinear reproduces a linear function).
    let grad = coded(1, 3, 3);
    let out = Resize::new(2, 2).apply(grad, &mut rng()).unwrap();
    assert_close(out.data(), &[2.75, 4.25, 17.75, 19.25], 1e-5);

    // 2x2 up to 4x4 (scale 0.5): axis samples 0 (clamped), 0.25, 0.75, 1 (clamped to last).
    let small = Image::new(1, 2, 2, vec![0., 1., 2., 3.]).unwrap();
    let out = Resize::new(4, 4).apply(small, &mut rng()).unwrap();
    let axis = [0.0f32, 0.25, 0.75, 1.0];
    let want: Vec<f32> = axis.iter().flat_map(|&y| axis.iter().map(move |&x| 2.0 * y + x)).collect();
    assert_close(out.data(), &want, 1e-6);

    // Same size: unchanged.
    let img = coded(2, 3, 5);
    assert_eq!(Resize::new(3, 5).apply(img.clone(), &mut rng()).unwrap(), img);
}

#[test]
fn resize_keep_aspect_then_centre_crop() {
    // 2x4 to 2x2: scale max(2/2, 2/4) = 1, so no resampling; then the centre 2x2 (columns 1, 2).
    let out = Resize::new(2, 2).mode(ResizeMode::KeepAspectCrop).apply(coded(1, 2, 4), &mut rng()).unwrap();
    assert_eq!(out.data(), &[1., 2., 11., 12.]);
    // 4x8 to 2x2: scale 0.5 to 2x4 (source coordinates 0.5, 2.5, 4.5, 6.5 across, 0.5, 2.5
    // down), then columns 1, 2: x = 2.5, 4.5.
    let out = Resize::new(2, 2).mode(ResizeMode::KeepAspectCrop).apply(coded(1, 4, 8), &mut rng()).unwrap();
    assert_close(out.data(), &[7.5, 9.5, 27.5, 29.5], 1e-5);
    // Stretch instead distorts: all 8 columns squeezed into 2 (x = 1.5, 5.5).
    let out = Resize::new(2, 2).apply(coded(1, 4, 8), &mut rng()).unwrap();
    assert_close(out.data(), &[6.5, 10.5, 26.5, 30.5], 1e-5);
}

#[test]
fn rotations() {
    let img = coded(2, 5, 5);
    // By 0: identity, through the full bilinear path.
    assert_eq!(rotate(&img, 0.0, 0.0), img);
    let zero = RandomRotation::new(0.0).unwrap();
    assert_eq!(zero.apply(img.clone(), &mut rng()).unwrap(), img);

    // By 90 degrees counter-clockwise: output (y, x) takes input (x, w - 1 - y). So the top row
    // of the output is the input's right column read top to bottom.
    let img = coded(1, 3, 3);
    let out = rotate(&img, 90.0, 0.0);
    assert_close(out.data(), &[2., 12., 22., 1., 11., 21., 0., 10., 20.], 1e-4);
    // Four quarter turns: back where it started.
    let mut back = img.clone();
    for _ in 0..4 {
        back = rotate(&back, 90.0, 0.0);
    }
    assert_close(back.data(), img.data(), 1e-3);

    // By 45 degrees on 3x3 with fill -1: the centre stays, corners sample outside the image.
    let out = rotate(&img, 45.0, -1.0);
    assert!((out.pixel(0, 1, 1) - 11.0).abs() < 1e-4);
    // Corner (0, 0), at offset (-1, -1) from the centre, comes from row 1 - sqrt(2), column 1:
    // between the fill above the image and pixel (0, 1) = 1, weights sqrt(2) - 1 and 2 - sqrt(2).
    let (fill, pixel_0_1) = (-1.0f32, 1.0f32);
    let want = (2.0f32.sqrt() - 1.0) * fill + (2.0 - 2.0f32.sqrt()) * pixel_0_1;
    assert!((out.pixel(0, 0, 0) - want).abs() < 1e-4, "{}", out.pixel(0, 0, 0));

    // A random rotation stays within its range: the centre pixel never moves.
    let r = RandomRotation::new(10.0).unwrap();
    for s in 0..20 {
        let out = r.apply(coded(1, 5, 5), &mut Rng::new(s)).unwrap();
        assert!((out.pixel(0, 2, 2) - 22.0).abs() < 1e-4);
    }
}

#[test]
fn colour_jitter_with_factor_one_is_identity() {
    let img = ToFloat.apply(coded(3, 4, 4), &mut rng()).unwrap();
    let one = ColorJitter::ranges((1.0, 1.0), (1.0, 1.0), (1.0, 1.0)).unwrap();
    for s in 0..5 {
        assert_eq!(one.apply(img.clone(), &mut Rng::new(s)).unwrap(), img);
    }
    let none = ColorJitter::new(0.0, 0.0, 0.0).unwrap();
    assert_eq!(none.apply(img.clone(), &mut rng()).unwrap(), img);
    // Real jitter changes the image, stays in [0, 1], and repeats for the same generator.
    let j = ColorJitter::new(0.4, 0.4, 0.4).unwrap();
    let a = j.apply(img.clone(), &mut Rng::new(3)).unwrap();
    assert_ne!(a, img);
    assert!(a.data().iter().all(|v| (0.0..=1.0).contains(v)));
    assert_eq!(a, j.apply(img.clone(), &mut Rng::new(3)).unwrap());
    let err = j.apply(Image::zeros(2, 2, 2), &mut rng()).unwrap_err();
    assert!(err.to_string().contains("2x2x2"), "{err}");
}

#[test]
fn pipeline_is_reproducible_per_sample() {
    let t = Compose::new()
        .then(RandomCrop::new(4, 4).padding(1))
        .then(RandomHorizontalFlip::new(0.5))
        .then(ToFloat)
        .then(Normalize::new(&[0.5], &[0.25]).unwrap());
    let img = coded(3, 4, 4);
    let a = t.apply(img.clone(), &mut sample_rng(7, 2, 13)).unwrap();
    let b = t.apply(img.clone(), &mut sample_rng(7, 2, 13)).unwrap();
    assert_eq!(a, b);
    let differs = (0..20).filter(|&i| t.apply(img.clone(), &mut sample_rng(7, 2, i)).unwrap() != a).count();
    assert!(differs > 10, "{differs}");
}
