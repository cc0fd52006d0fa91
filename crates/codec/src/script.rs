//! JavaScript codecs, as IoTDA runs them: the product's script defines `decode(payload, topic)`,
//! which turns the device's bytes into the platform's JSON (a string, or an object), and
//! `encode(json)`, which turns the platform's JSON (a string) into bytes. `payload` holds the bytes
//! as Java's `byte[]` shows them to IoTDA scripts (−128..127), so `payload[i] & 0xFF` works as
//! there.
//!
//! Each call runs in a fresh QuickJS runtime with no I/O, a memory limit and an operation budget
//! (counted by QuickJS's interrupt callback, not by a clock, so a limit hit is reproducible): a
//! runaway script fails that one message with an error that says so.

use std::cell::Cell;
use std::rc::Rc;

use rquickjs::{Context, Ctx, Function, Runtime};
use serde_json::Value;

use crate::error::{CodecError, definition};
use crate::wire::Decoded;

/// Largest script accepted (IoTDA's limit).
pub const MAX_SCRIPT_BYTES: usize = 1024 * 1024;
/// Memory one call may use.
pub const MEMORY_LIMIT: usize = 32 * 1024 * 1024;
/// Interrupt callbacks (QuickJS calls one about every 10 000 operations) before a call is stopped.
pub const OPERATION_BUDGET: u32 = 2_000;

/// A checked script.
#[derive(Debug, Clone)]
pub struct Script {
    source: String,
}

enum Failure {
    Threw(String),
    OutOfBudget,
    OutOfMemory,
    Shape(String),
}

impl Failure {
    fn text(self) -> String {
        match self {
            Failure::Threw(message) => format!("the script threw: {message}"),
            Failure::OutOfBudget => format!(
                "the script ran longer than its limit (about {} million operations)",
                OPERATION_BUDGET / 100
            ),
            Failure::OutOfMemory => format!(
                "the script used more than its {} MB of memory",
                MEMORY_LIMIT >> 20
            ),
            Failure::Shape(text) => text,
        }
    }
}

impl Script {
    /// Checks a script: its size, that it runs, and that it defines `decode` and `encode`.
    pub fn new(source: &str) -> Result<Script, CodecError> {
        if source.len() > MAX_SCRIPT_BYTES {
            return Err(definition(format!(
                "the script is {} bytes; at most {MAX_SCRIPT_BYTES} are accepted",
                source.len()
            )));
        }
        let script = Script {
            source: source.to_owned(),
        };
        script
            .run(|ctx| {
                for name in ["decode", "encode"] {
                    if ctx.globals().get::<_, Function>(name).is_err() {
                        return Err(Failure::Shape(format!(
                            "the script defines no function {name}"
                        )));
                    }
                }
                Ok(())
            })
            .map_err(|f| definition(f.text()))?;
        Ok(script)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// `decode(payload, topic)`.
    pub fn decode(&self, payload: &[u8], topic: Option<&str>) -> Result<Decoded, CodecError> {
        let bytes: Vec<i32> = payload.iter().map(|b| i32::from(*b as i8)).collect();
        let text = self
            .run(|ctx| {
                let decode: Function = ctx.globals().get("decode").map_err(|e| thrown(ctx, e))?;
                let result: rquickjs::Value = match topic {
                    Some(topic) => decode.call((bytes, topic)),
                    None => decode.call((bytes,)),
                }
                .map_err(|e| thrown(ctx, e))?;
                as_json_text(ctx, result)
            })
            .map_err(|f| CodecError::Decode(f.text()))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| {
            CodecError::Decode(format!("decode returned something that is not JSON: {e}"))
        })?;
        check_decoded(&json).map_err(CodecError::Decode)?;
        Ok(Decoded {
            json,
            response: None,
        })
    }

    /// `encode(json)`: the command as a JSON string in, a byte array out.
    pub fn encode(&self, command: &Value) -> Result<Vec<u8>, CodecError> {
        let mut input = command.clone();
        if input.get("msg_type").is_none() {
            input["msg_type"] = Value::from("commands");
        }
        let text = input.to_string();
        self.run(|ctx| {
            let encode: Function = ctx.globals().get("encode").map_err(|e| thrown(ctx, e))?;
            let result: rquickjs::Value = encode.call((text,)).map_err(|e| thrown(ctx, e))?;
            let numbers: Vec<f64> = result
                .get()
                .map_err(|_| Failure::Shape("encode must return an array of byte values".into()))?;
            numbers
                .into_iter()
                .map(|n| {
                    if n.fract() == 0.0 && (-128.0..=255.0).contains(&n) {
                        Ok((n as i64 & 0xFF) as u8)
                    } else {
                        Err(Failure::Shape(format!(
                            "encode returned {n}, which is not a byte"
                        )))
                    }
                })
                .collect()
        })
        .map_err(|f| CodecError::Encode(f.text()))
    }

    /// Evaluates the script in a fresh, limited runtime and runs `f` in it.
    fn run<T>(&self, f: impl FnOnce(&Ctx<'_>) -> Result<T, Failure>) -> Result<T, Failure> {
        let runtime = Runtime::new().map_err(|e| Failure::Shape(e.to_string()))?;
        runtime.set_memory_limit(MEMORY_LIMIT);
        runtime.set_max_stack_size(512 * 1024);
        let spent = Rc::new(Cell::new(0u32));
        let counter = spent.clone();
        runtime.set_interrupt_handler(Some(Box::new(move || {
            counter.set(counter.get() + 1);
            counter.get() > OPERATION_BUDGET
        })));
        let context = Context::full(&runtime).map_err(|e| Failure::Shape(e.to_string()))?;
        let outcome = context.with(|ctx| {
            ctx.eval::<(), _>(self.source.as_str())
                .map_err(|e| thrown(&ctx, e))?;
            f(&ctx)
        });
        match outcome {
            Err(_) if spent.get() > OPERATION_BUDGET => Err(Failure::OutOfBudget),
            other => other,
        }
    }
}

/// The JS exception behind an error, as text.
fn thrown(ctx: &Ctx<'_>, error: rquickjs::Error) -> Failure {
    if !matches!(error, rquickjs::Error::Exception) {
        return Failure::Threw(error.to_string());
    }
    let caught = ctx.catch();
    let message = caught
        .as_exception()
        .and_then(|e| e.message())
        .or_else(|| caught.get::<String>().ok())
        .unwrap_or_else(|| "an exception".to_owned());
    if message.contains("out of memory") {
        Failure::OutOfMemory
    } else {
        Failure::Threw(message)
    }
}

/// What `decode` returned, as JSON text: IoTDA scripts return `JSON.stringify(...)`; an object
/// is accepted too.
fn as_json_text<'js>(ctx: &Ctx<'js>, result: rquickjs::Value<'js>) -> Result<String, Failure> {
    if let Some(text) = result.as_string() {
        return text.to_string().map_err(|e| Failure::Shape(e.to_string()));
    }
    match ctx.json_stringify(result) {
        Ok(Some(text)) => text.to_string().map_err(|e| Failure::Shape(e.to_string())),
        _ => Err(Failure::Shape("decode returned nothing".into())),
    }
}

/// The platform understands property reports and command responses.
fn check_decoded(json: &Value) -> Result<(), String> {
    match json["msg_type"].as_str() {
        Some("properties_report") if json["services"].is_array() => Ok(()),
        Some("properties_report") => Err("a properties_report needs a services array".into()),
        Some("command_response") => Ok(()),
        Some(other) => Err(format!(
            "decode returned msg_type {other:?}; the platform takes properties_report and command_response"
        )),
        None => Err("decode returned no msg_type".into()),
    }
}
