//! A Keras-style model summary of the transfer-learning model: the VGG-16
//! base, GlobalAveragePooling2D and Dense(10, softmax) named
//! `classification`, with trainable counts for stage 1 or stage 2.

use crate::model::vgg::{Kind, LAYERS};
use std::fmt::Write;

/// Integer grouped with commas, as Keras prints it: 14719818 -> "14,719,818".
pub fn commas(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Keras's size suffix for f32 parameters: " (56.15 MB)".
fn size(n: usize) -> String {
    let bytes = n as f64 * 4.0;
    if bytes >= 1024.0 * 1024.0 {
        format!("{:.2} MB", bytes / 1024.0 / 1024.0)
    } else if bytes >= 1024.0 {
        format!("{:.2} KB", bytes / 1024.0)
    } else {
        format!("{bytes:.0} B")
    }
}

pub struct Row {
    pub name: String,
    pub kind: &'static str,
    pub shape: String,
    pub params: usize,
    pub trainable: bool,
}

/// Every layer of the model with its output shape at `size` and whether it
/// trains in `stage` (1: head only; 2: block5 and head).
pub fn rows(image_size: usize, stage: u8, hidden: Option<usize>, classes: usize) -> Vec<Row> {
    let mut rows = vec![Row {
        name: "input_layer".into(),
        kind: "InputLayer",
        shape: format!("(None, {image_size}, {image_size}, 3)"),
        params: 0,
        trainable: false,
    }];
    let (mut s, mut c) = (image_size, 3);
    for (i, l) in LAYERS.iter().enumerate() {
        let trainable = stage >= 2 && i >= crate::model::vgg::BLOCK5_START;
        let (kind, params) = match l.kind {
            Kind::Conv { cin, cout } => {
                c = cout;
                ("Conv2D", 9 * cin * cout + cout)
            }
            Kind::Pool => {
                s /= 2;
                ("MaxPooling2D", 0)
            }
        };
        rows.push(Row {
            name: l.name.into(),
            kind,
            shape: format!("(None, {s}, {s}, {c})"),
            params,
            trainable,
        });
    }
    rows.push(Row {
        name: "global_average_pooling2d".into(),
        kind: "GlobalAveragePooling2D",
        shape: "(None, 512)".into(),
        params: 0,
        trainable: true,
    });
    let mut width = 512;
    if let Some(h) = hidden {
        rows.push(Row {
            name: "dense".into(),
            kind: "Dense",
            shape: format!("(None, {h})"),
            params: width * h + h,
            trainable: true,
        });
        width = h;
    }
    rows.push(Row {
        name: "classification".into(),
        kind: "Dense",
        shape: format!("(None, {classes})"),
        params: width * classes + classes,
        trainable: true,
    });
    rows
}

/// The table, the three totals lines, then every layer's trainable flag.
pub fn render(image_size: usize, stage: u8, hidden: Option<usize>, classes: usize) -> String {
    let rows = rows(image_size, stage, hidden, classes);
    let mut out = String::new();
    let rule = "_".repeat(88);
    let _ = writeln!(
        out,
        "Model: \"vgg16_transfer\" (stage {stage}, {image_size}x{image_size} input)"
    );
    let _ = writeln!(out, "{rule}");
    let _ = writeln!(out, " {:<52}{:<24}{:>12}", "Layer (type)", "Output Shape", "Param #");
    let _ = writeln!(out, "{}", "=".repeat(88));
    for r in &rows {
        let _ = writeln!(
            out,
            " {:<52}{:<24}{:>12}",
            format!("{} ({})", r.name, r.kind),
            r.shape,
            commas(r.params)
        );
    }
    let _ = writeln!(out, "{}", "=".repeat(88));
    let total: usize = rows.iter().map(|r| r.params).sum();
    let trainable: usize = rows.iter().filter(|r| r.trainable).map(|r| r.params).sum();
    let _ = writeln!(out, "Total params: {} ({})", commas(total), size(total));
    let _ = writeln!(out, "Trainable params: {} ({})", commas(trainable), size(trainable));
    let _ = writeln!(
        out,
        "Non-trainable params: {} ({})",
        commas(total - trainable),
        size(total - trainable)
    );
    let _ = writeln!(out, "{rule}");
    let _ = writeln!(out, "Layer trainability:");
    for r in &rows {
        let _ = writeln!(out, "  {:<26} {}", r.name, if r.trainable { "True" } else { "False" });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keras_totals_for_both_stages() {
        let s1 = render(224, 1, None, 10);
        assert!(s1.contains("\nTotal params: 14,719,818 (56.15 MB)\n"), "{s1}");
        assert!(s1.contains("\nTrainable params: 5,130 ("), "{s1}");
        assert!(s1.contains("\nNon-trainable params: 14,714,688 ("), "{s1}");
        let s2 = render(224, 2, None, 10);
        assert!(s2.contains("\nTrainable params: 7,084,554 ("), "{s2}");
        assert!(s2.contains("\nNon-trainable params: 7,635,264 ("), "{s2}");
        assert!(s2.contains("block5_pool (MaxPooling2D)") && s2.contains("(None, 7, 7, 512)"));
    }

    #[test]
    fn commas_group_by_thousands() {
        assert_eq!(commas(0), "0");
        assert_eq!(commas(999), "999");
        assert_eq!(commas(1000), "1,000");
        assert_eq!(commas(14719818), "14,719,818");
    }
}
