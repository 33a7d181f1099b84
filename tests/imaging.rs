//! Image reading, pixel scaling, patch grids and patch streaming
//! (src/imaging.rs). Test images are written with the `image` crate directly,
//! so reading is checked against an independent encoder.

use std::path::{Path, PathBuf};

use cellmorph::imaging::{
    fill_patches, read_dimensions, read_gray, read_sample_list, read_sample_list_with, scale_pixel,
    write_sample_list, BitDepth, GrayImage, PatchGrid, PatchStream, SampleColumns, SampleImage,
    DEFAULT_PATCH,
};
use cellmorph::Error;
use image::{ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};

/// A fresh, empty directory for one test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch(name: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("cellmorph-imaging-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// 8-bit pixels covering 0 and 255 and values in between.
fn pattern8(w: u32, h: u32) -> Vec<u8> {
    (0..w * h).map(|i| (i * 37 % 256) as u8).collect()
}

/// 16-bit pixels covering 0, 65535 and values whose low byte matters.
fn pattern16(w: u32, h: u32) -> Vec<u16> {
    let mut v: Vec<u16> = (0..w * h).map(|i| (i * 4099 % 65536) as u16).collect();
    v[0] = 0;
    v[1] = u16::MAX;
    v[2] = 1;
    v
}

fn widen(v: &[u8]) -> Vec<u16> {
    v.iter().map(|&p| u16::from(p)).collect()
}

#[test]
fn gray8_round_trips_through_png_and_tiff() {
    let dir = scratch("gray8");
    let (w, h) = (23, 17);
    let pixels = pattern8(w, h);
    assert!(pixels.contains(&0) && pixels.contains(&255));
    let buf: ImageBuffer<Luma<u8>, _> = ImageBuffer::from_raw(w, h, pixels.clone()).unwrap();
    for (name, format) in [("a.png", ImageFormat::Png), ("a.tif", ImageFormat::Tiff)] {
        let path = dir.join(name);
        buf.save_with_format(&path, format).unwrap();
        let img = read_gray(&path).unwrap();
        assert_eq!((img.width(), img.height()), (w as usize, h as usize));
        assert_eq!(img.depth(), BitDepth::Eight);
        assert_eq!(img.data(), widen(&pixels).as_slice(), "{name}");
        assert_eq!(img.source(), Some(path.as_path()));
        assert_eq!(read_dimensions(&path).unwrap(), (w as usize, h as usize));
    }
}

#[test]
fn gray16_round_trips_through_png_and_tiff() {
    let dir = scratch("gray16");
    let (w, h) = (19, 11);
    let pixels = pattern16(w, h);
    let buf: ImageBuffer<Luma<u16>, _> = ImageBuffer::from_raw(w, h, pixels.clone()).unwrap();
    for (name, format) in [("a.png", ImageFormat::Png), ("a.tiff", ImageFormat::Tiff)] {
        let path = dir.join(name);
        buf.save_with_format(&path, format).unwrap();
        let img = read_gray(&path).unwrap();
        assert_eq!(img.depth(), BitDepth::Sixteen);
        assert_eq!(img.data(), pixels.as_slice(), "{name}");
    }
}

#[test]
fn own_writer_round_trips_both_depths_and_formats() {
    let dir = scratch("save");
    let img8 = GrayImage::new(9, 5, BitDepth::Eight, widen(&pattern8(9, 5))).unwrap();
    let img16 = GrayImage::new(9, 5, BitDepth::Sixteen, pattern16(9, 5)).unwrap();
    for img in [&img8, &img16] {
        for name in ["x.png", "x.TIF"] {
            let path = dir.join(name);
            img.save(&path).unwrap();
            let back = read_gray(&path).unwrap();
            assert_eq!(back.depth(), img.depth());
            assert_eq!(back.data(), img.data());
        }
    }
    assert!(img8.save(dir.join("x.jpg")).is_err());
}

#[test]
fn scaling_is_exact_at_the_ends_and_matches_pytorch() {
    assert_eq!(scale_pixel(0, BitDepth::Eight), -1.0);
    assert_eq!(scale_pixel(255, BitDepth::Eight), 1.0);
    assert_eq!(scale_pixel(0, BitDepth::Sixteen), -1.0);
    assert_eq!(scale_pixel(65535, BitDepth::Sixteen), 1.0);
    // ToTensor (p / max in f32) then Normalize(0.5, 0.5): bit-identical.
    for p in 0..=255u16 {
        let torch = (f32::from(p) / 255.0 - 0.5) / 0.5;
        assert_eq!(
            scale_pixel(p, BitDepth::Eight).to_bits(),
            torch.to_bits(),
            "p = {p}"
        );
    }
    for p in (0..=65535u16).step_by(7) {
        let torch = (f32::from(p) / 65535.0 - 0.5) / 0.5;
        assert_eq!(
            scale_pixel(p, BitDepth::Sixteen).to_bits(),
            torch.to_bits(),
            "p = {p}"
        );
    }
    let img = GrayImage::new(2, 1, BitDepth::Eight, vec![0, 255]).unwrap();
    assert_eq!(img.scaled(), vec![-1.0, 1.0]);
}

#[test]
fn colour_input_becomes_the_value_channel() {
    let dir = scratch("rgb");
    let rgb8: ImageBuffer<Rgb<u8>, _> =
        ImageBuffer::from_raw(3, 1, vec![10, 200, 30, 255, 0, 0, 1, 2, 3]).unwrap();
    rgb8.save(dir.join("rgb8.png")).unwrap();
    let img = read_gray(dir.join("rgb8.png")).unwrap();
    assert_eq!(
        (img.depth(), img.data()),
        (BitDepth::Eight, &[200, 255, 3][..])
    );

    // Alpha is ignored, even when it is the largest channel.
    let rgba8: ImageBuffer<Rgba<u8>, _> =
        ImageBuffer::from_raw(2, 1, vec![5, 6, 7, 255, 90, 80, 70, 0]).unwrap();
    rgba8.save(dir.join("rgba8.png")).unwrap();
    assert_eq!(read_gray(dir.join("rgba8.png")).unwrap().data(), &[7, 90]);

    let rgb16: ImageBuffer<Rgb<u16>, _> =
        ImageBuffer::from_raw(2, 1, vec![1000, 65535, 3, 7, 6, 5]).unwrap();
    rgb16
        .save_with_format(dir.join("rgb16.tif"), ImageFormat::Tiff)
        .unwrap();
    let img = read_gray(dir.join("rgb16.tif")).unwrap();
    assert_eq!(
        (img.depth(), img.data()),
        (BitDepth::Sixteen, &[65535, 7][..])
    );

    let gray_alpha: ImageBuffer<LumaA<u8>, _> =
        ImageBuffer::from_raw(2, 1, vec![12, 255, 250, 3]).unwrap();
    gray_alpha.save(dir.join("la8.png")).unwrap();
    assert_eq!(read_gray(dir.join("la8.png")).unwrap().data(), &[12, 250]);
}

/// The error's message, checked to name `path`.
fn message_naming(err: Error, path: &Path) -> String {
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name {}: {msg}",
        path.display()
    );
    msg
}

#[test]
fn bad_files_give_errors_that_name_the_file() {
    let dir = scratch("bad");
    let missing = dir.join("missing.png");
    let err = read_gray(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    message_naming(err, &missing);

    let garbage = dir.join("garbage.png");
    std::fs::write(&garbage, b"this is not an image at all").unwrap();
    let msg = message_naming(read_gray(&garbage).unwrap_err(), &garbage);
    assert!(msg.contains("not a PNG or TIFF"), "{msg}");

    let empty = dir.join("empty.tif");
    std::fs::write(&empty, b"").unwrap();
    let msg = message_naming(read_gray(&empty).unwrap_err(), &empty);
    assert!(msg.contains("file is empty"), "{msg}");

    // A valid PNG cut short inside its pixel data.
    let full = dir.join("full.png");
    ImageBuffer::<Luma<u8>, _>::from_raw(64, 64, pattern8(64, 64))
        .unwrap()
        .save(&full)
        .unwrap();
    let bytes = std::fs::read(&full).unwrap();
    let truncated = dir.join("truncated.png");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_gray(&truncated).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    let msg = message_naming(err, &truncated);
    assert!(msg.contains("corrupt or truncated"), "{msg}");

    // PNG signature followed by noise.
    let corrupt = dir.join("corrupt.png");
    let mut noise = bytes[..8].to_vec();
    noise.extend((0..500u32).map(|i| (i * 97 % 251) as u8));
    std::fs::write(&corrupt, &noise).unwrap();
    message_naming(read_gray(&corrupt).unwrap_err(), &corrupt);

    // 32-bit float pixels are refused, not silently converted.
    let float = dir.join("float.tif");
    ImageBuffer::<Rgb<f32>, _>::from_raw(2, 2, vec![0.5f32; 12])
        .unwrap()
        .save_with_format(&float, ImageFormat::Tiff)
        .unwrap();
    let msg = message_naming(read_gray(&float).unwrap_err(), &float);
    assert!(msg.contains("unsupported"), "{msg}");
}

#[test]
fn invalid_images_are_rejected_on_construction() {
    assert!(GrayImage::new(0, 5, BitDepth::Eight, vec![]).is_err());
    assert!(GrayImage::new(2, 2, BitDepth::Eight, vec![0; 3]).is_err());
    assert!(GrayImage::new(2, 1, BitDepth::Eight, vec![0, 256]).is_err());
    assert!(GrayImage::new(2, 1, BitDepth::Sixteen, vec![0, 256]).is_ok());
}

#[test]
fn patch_grids_drop_the_remainder_strips() {
    let g = PatchGrid::new(5120, 5120, DEFAULT_PATCH).unwrap();
    assert_eq!((g.rows(), g.cols(), g.len()), (32, 32, 1024));
    // 330 rows × 500 columns: 2 patch rows, 3 patch columns.
    let g = PatchGrid::new(500, 330, 160).unwrap();
    assert_eq!((g.rows(), g.cols(), g.len()), (2, 3, 6));
    assert_eq!(g.origin(0), Some((0, 0)));
    assert_eq!(g.origin(2), Some((320, 0)));
    assert_eq!(g.origin(3), Some((0, 160)));
    assert_eq!(g.origin(6), None);
    let g = PatchGrid::new(160, 160, 160).unwrap();
    assert_eq!(g.len(), 1);
    assert!(PatchGrid::new(160, 160, 0).is_err());
    assert!(PatchGrid::new(159, 500, 160).is_err());
    assert!(PatchGrid::new(500, 159, 160).is_err());
}

#[test]
fn images_smaller_than_a_patch_are_reported_with_their_file() {
    let dir = scratch("small");
    let path = dir.join("small.png");
    ImageBuffer::<Luma<u8>, _>::from_raw(200, 100, pattern8(200, 100))
        .unwrap()
        .save(&path)
        .unwrap();
    let img = read_gray(&path).unwrap();
    let msg = message_naming(img.patch_grid(160).unwrap_err(), &path);
    assert!(msg.contains("200×100") && msg.contains("160×160"), "{msg}");
    message_naming(PatchStream::new(&img, 160, 8).unwrap_err(), &path);
    assert_eq!(img.patch_grid(100).unwrap().len(), 2);
}

/// A 16-bit image whose every pixel value encodes its position.
fn positional(width: usize, height: usize) -> GrayImage {
    let data = (0..width * height)
        .map(|i| ((i % width) * 7 + (i / width) * 13) as u16)
        .collect();
    GrayImage::new(width, height, BitDepth::Sixteen, data).unwrap()
}

#[test]
fn a_5120_image_streams_every_patch_once_in_row_major_order() {
    let img = positional(5120, 5120);
    let batch = 100;
    let mut stream = PatchStream::new(&img, 160, batch).unwrap();
    let grid = *stream.grid();
    assert_eq!((grid.rows(), grid.cols()), (32, 32));
    let mut next = 0;
    let mut batches = 0;
    while let Some(b) = stream.next_batch().unwrap() {
        batches += 1;
        assert_eq!(b.indices.start, next, "batches are contiguous, in order");
        assert!(!b.indices.is_empty() && b.indices.len() <= batch);
        assert_eq!(b.data.len(), b.indices.len() * 160 * 160);
        for (k, index) in b.indices.clone().enumerate() {
            let (x0, y0) = grid.origin(index).unwrap();
            assert_eq!((x0, y0), ((index % 32) * 160, (index / 32) * 160));
            let patch = &b.data[k * 25600..(k + 1) * 25600];
            for (dy, dx) in [(0, 0), (0, 159), (159, 0), (159, 159), (77, 31)] {
                let want = scale_pixel(img.pixel(x0 + dx, y0 + dy).unwrap(), BitDepth::Sixteen);
                assert_eq!(patch[dy * 160 + dx], want, "patch {index} at ({dx}, {dy})");
            }
        }
        next = b.indices.end;
    }
    assert_eq!(next, 1024);
    assert_eq!(batches, 11);
    assert!(stream.next_batch().unwrap().is_none());
}

#[test]
fn caller_buffers_get_exactly_the_patches_asked_for() {
    let img = positional(500, 330);
    let grid = img.patch_grid(160).unwrap();
    let ranges: Vec<_> = grid.batches(4).unwrap().collect();
    assert_eq!(ranges, vec![0..4, 4..6]);
    assert!(grid.batches(0).is_err());

    let mut buf = vec![0f32; 2 * grid.patch_len()];
    fill_patches(&img, &grid, 4..6, &mut buf).unwrap();
    // Patch 4 is row 1, column 1: every pixel, not just samples.
    for dy in 0..160 {
        for dx in 0..160 {
            let want = scale_pixel(img.pixel(160 + dx, 160 + dy).unwrap(), BitDepth::Sixteen);
            assert_eq!(buf[dy * 160 + dx], want);
        }
    }
    assert!(fill_patches(&img, &grid, 4..6, &mut buf[1..]).is_err());
    assert!(fill_patches(&img, &grid, 5..7, &mut buf).is_err());
    let other = PatchGrid::new(640, 330, 160).unwrap();
    assert!(fill_patches(&img, &other, 0..2, &mut buf).is_err());
}

#[test]
fn sample_lists_round_trip_and_resolve_relative_paths() {
    let dir = scratch("list");
    let path = dir.join("samples.csv");
    let entries = vec![
        SampleImage {
            sample: "s1".into(),
            path: "images/a,1.png".into(),
        },
        SampleImage {
            sample: "s1".into(),
            path: "/abs/b.tif".into(),
        },
        SampleImage {
            sample: "s2".into(),
            path: "c.png".into(),
        },
    ];
    write_sample_list(&path, &entries).unwrap();
    let back = read_sample_list(&path).unwrap();
    assert_eq!(back.len(), 3);
    assert_eq!(back[0].path, dir.join("images/a,1.png"));
    assert_eq!(back[1].path, PathBuf::from("/abs/b.tif"));
    assert_eq!(
        back.iter().map(|e| e.sample.as_str()).collect::<Vec<_>>(),
        ["s1", "s1", "s2"]
    );

    let bad = SampleImage {
        sample: "a,b".into(),
        path: "x.png".into(),
    };
    assert!(write_sample_list(&path, &[bad]).is_err());
    std::fs::write(&path, "name,file\ns1,a.png\n").unwrap();
    message_naming(read_sample_list(&path).unwrap_err(), &path);
    std::fs::write(&path, "sample,image\ns1\n").unwrap();
    let msg = message_naming(read_sample_list(&path).unwrap_err(), &path);
    assert!(msg.contains("line 2"), "{msg}");

    // Columns by name, in any order, extra columns ignored; `path` is the
    // second default for the image column.
    std::fs::write(
        &path,
        "batch,Path,Sample,note\nb1,x/a.png,s1,\"q, r\"\nb2,b.png,s2,\n",
    )
    .unwrap();
    let back = read_sample_list(&path).unwrap();
    assert_eq!(back[0].sample, "s1");
    assert_eq!(back[0].path, dir.join("x/a.png"));
    assert_eq!(back[1].sample, "s2");
    std::fs::write(&path, "id,file,batch\ns1,a.png,b1\n").unwrap();
    let msg = message_naming(read_sample_list(&path).unwrap_err(), &path);
    assert!(
        msg.contains("--sample-column") && msg.contains("id,file,batch"),
        "{msg}"
    );
    let cols = SampleColumns {
        sample: Some("id".into()),
        image: Some("file".into()),
    };
    let back = read_sample_list_with(&path, &cols).unwrap();
    assert_eq!(
        (back[0].sample.as_str(), back[0].path.clone()),
        ("s1", dir.join("a.png"))
    );
    let cols = SampleColumns {
        sample: Some("id".into()),
        image: Some("image".into()),
    };
    let msg = message_naming(read_sample_list_with(&path, &cols).unwrap_err(), &path);
    assert!(
        msg.contains("`image`") && msg.contains("--image-column"),
        "{msg}"
    );
}

/// The real images the tests read (tests/data, see its README).
fn real_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

#[test]
fn real_microscopy_images_read_in_every_format_present() {
    let data = real_data();
    // 8-bit grayscale PNG (BBBC007 and ExampleFly fields).
    let img = read_gray(data.join("bbbc007/A9/A9_p5d.png")).unwrap();
    assert_eq!(
        (img.width(), img.height(), img.depth()),
        (450, 450, BitDepth::Eight)
    );
    assert_eq!(img.patch_grid(160).unwrap().len(), 4);
    let img = read_gray(data.join("examplefly/01_POS002_D.png")).unwrap();
    assert_eq!((img.width(), img.height()), (1000, 1006));
    let grid = img.patch_grid(160).unwrap();
    assert_eq!((grid.rows(), grid.cols()), (6, 6));
    assert!(img.data().iter().any(|&p| p > 0));

    // 16-bit grayscale PNG whose values only span 0..=235 (data README).
    let img = read_gray(data.join("stardist_dsb2018/img2d.png")).unwrap();
    assert_eq!(
        (img.width(), img.height(), img.depth()),
        (512, 512, BitDepth::Sixteen)
    );
    assert_eq!(img.data().iter().max(), Some(&235));

    // 8-bit RGB PNG: the value channel.
    let img = read_gray(data.join("single_cells/preview.png")).unwrap();
    assert_eq!(
        (img.width(), img.height(), img.depth()),
        (256, 128, BitDepth::Eight)
    );
}
