//! `kiln export` and `kiln import`: a kiln model to an ONNX file and back.
//!
//! The CLI's metadata of a model file ([`ModelMeta`]: data, class names, preprocessing) travels
//! inside the ONNX file as metadata: the class names as `kiln.class_names` (a JSON list, for any
//! reader), the whole of it as `kiln.cli.model_json`. `kiln import` puts it back into the kiln
//! model file's metadata when the ONNX file has it, so `kiln eval` and `kiln predict` prepare
//! inputs as training did.

use kiln::io::onnx::{self, OnnxOptions};
use kiln::model::Model;

use crate::models::{self, ModelMeta};
use crate::{CmdResult, ExportArgs, ImportArgs};

/// The metadata key of the CLI's side file.
const META_KEY: &str = "kiln.cli.model_json";

/// `kiln export MODEL OUT.onnx [--opset N] [--static-batch]`.
pub fn export(a: ExportArgs) -> CmdResult {
    let (model, meta, path) = models::load_model(&a.model)?;
    let mut options = OnnxOptions { opset: a.opset, dynamic_batch: !a.static_batch, ..OnnxOptions::default() };
    if let Some(m) = &meta {
        options.class_names = Some(m.classes.clone());
        options.metadata.push((META_KEY.into(), serde_json::to_string(m).map_err(|e| e.to_string())?));
    }
    model.export_onnx(&a.out, options).map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "wrote {} (ONNX opset {}, batch {}, {} parameters{})",
        a.out.display(),
        a.opset,
        if a.static_batch { model.batch_size().to_string() } else { "dynamic".into() },
        model.param_count(),
        meta.map_or(String::new(), |m| format!(", {} class names", m.classes.len()))
    );
    Ok(())
}

/// `kiln import FILE.onnx OUT`.
pub fn import(a: ImportArgs) -> CmdResult {
    if !a.file.exists() {
        return Err(format!("{}: no such ONNX file", a.file.display()));
    }
    let model = Model::from_onnx(&a.file).map_err(|e| e.to_string())?;
    let metadata = onnx::metadata(&a.file).map_err(|e| e.to_string())?;
    let meta = match metadata.iter().find(|(k, _)| k == META_KEY) {
        Some((_, json)) => Some(
            serde_json::from_str::<ModelMeta>(json)
                .map_err(|e| format!("{}: metadata {META_KEY}: {e}", a.file.display()))?,
        ),
        None => None,
    };
    let side = models::meta_path(&a.out);
    let mut note = match &meta {
        Some(m) => {
            models::save_model(&model, &a.out, m)?;
            "data, class names and preprocessing in its metadata".to_string()
        }
        None => {
            model.save(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
            "no kiln metadata in the file: give `kiln eval` --data".to_string()
        }
    };
    if side.exists() {
        // A side file of an older kiln, written for an earlier model at OUT: it would describe the
        // wrong one.
        std::fs::remove_file(&side).map_err(|e| format!("{}: {e}", side.display()))?;
        note += &format!(" (removed the old {})", side.display());
    }
    println!(
        "wrote {} ({} layers, {} parameters; {note})",
        a.out.display(),
        model.nodes().len() - 1,
        model.param_count()
    );
    Ok(())
}
