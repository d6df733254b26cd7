//! `kiln launch`: starts the workers of a data-parallel job (see `kiln::dist::Launch`). Its
//! arguments are parsed here rather than by clap: everything after the program belongs to it.
//!
//! ```text
//! kiln launch --nproc 2 -- target/release/examples/my_training --epochs 3
//! kiln launch --nnodes 2 --node-rank 0 --nproc 8 --master-addr 10.0.0.1 --master-port 29500 -- ./train
//! ```

use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

use kiln::dist::Launch;

const USAGE: &str = "\
usage: kiln launch [options] [--] PROGRAM [ARGS...]

Starts the workers of a data-parallel job on this machine: one process per device, each told
its place by RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (as
torchrun does). When one worker fails, the others get the grace period to stop on their own,
then are killed; the exit code is the failed worker's.

options:
  --nproc N           workers on this machine (also --nproc-per-node; default 1)
  --nnodes M          machines in the job (default 1)
  --node-rank K       this machine's index, 0..M (default 0)
  --master-addr A     address of machine 0 that every machine reaches (default 127.0.0.1)
  --master-port P     rank 0's port (default: a free port with one machine, else 29500)
  --grace SECONDS     time the others get to stop after a failure (default 10)

Several machines: run the same command on each, with its own --node-rank.";

fn parse(args: Vec<OsString>) -> Result<Launch, String> {
    let mut it = args.into_iter();
    let mut launch = Launch::new(1, "");
    let mut program: Option<OsString> = None;
    fn value<T: std::str::FromStr>(flag: &str, v: Option<OsString>) -> Result<T, String> {
        let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
        let s = v.to_string_lossy().into_owned();
        s.parse().map_err(|_| format!("{flag}: invalid value '{s}'"))
    }
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--") => {
                program = it.next();
                break;
            }
            Some("--nproc" | "--nproc-per-node" | "--nproc_per_node") => launch.nproc = value("--nproc", it.next())?,
            Some("--nnodes") => launch.nnodes = value("--nnodes", it.next())?,
            Some("--node-rank" | "--node_rank") => launch.node_rank = value("--node-rank", it.next())?,
            Some("--master-addr" | "--master_addr") => launch.master_addr = value("--master-addr", it.next())?,
            Some("--master-port" | "--master_port") => launch.master_port = Some(value("--master-port", it.next())?),
            Some("--grace") => {
                let s: f64 = value("--grace", it.next())?;
                if !(s >= 0.0 && s.is_finite()) {
                    return Err(format!("--grace: expected seconds >= 0, got {s}"));
                }
                launch.grace = Duration::from_secs_f64(s);
            }
            Some(f) if f.starts_with("--") => return Err(format!("unknown option {f}")),
            _ => {
                program = Some(a);
                break;
            }
        }
    }
    launch.program = program.ok_or("no program to launch")?;
    launch.args = it.collect();
    Ok(launch)
}

/// Runs `kiln launch` with the arguments after `launch`.
pub fn main(rest: Vec<OsString>) -> ExitCode {
    if rest.iter().any(|a| a == "-h" || a == "--help") && !rest.iter().any(|a| a == "--") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let launch = match parse(rest) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kiln launch: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match launch.run() {
        Ok(report) => {
            let code = report.code();
            if let Some((rank, _)) = report.first_failure {
                eprintln!("kiln launch: rank {rank} failed; exiting with its code {code}");
            }
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("kiln launch: {e}");
            ExitCode::from(1)
        }
    }
}
