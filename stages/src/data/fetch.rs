//! `haic-pipe data fetch NAME`: downloads a well-known data set from its
//! canonical location, checks every file against the checksum its publisher
//! gives (MD5 for these sets), resumes a broken download where it stopped
//! (HTTP `Range`), and makes each file appear by one rename only once it is
//! complete and correct. Archives (CIFAR-10) are unpacked the same way.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One file of a data set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteFile {
    pub url: String,
    /// Name under the destination folder.
    pub name: String,
    pub md5: String,
    /// For a `.tar.gz`: the members to unpack (name in the archive -> name in dest).
    #[serde(default)]
    pub extract: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataSet {
    pub name: String,
    pub licence: String,
    pub files: Vec<RemoteFile>,
}

fn idx_set(name: &str, base: &str, licence: &str, md5s: [&str; 4]) -> DataSet {
    let names = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ];
    DataSet {
        name: name.into(),
        licence: licence.into(),
        files: names
            .iter()
            .zip(md5s)
            .map(|(n, m)| RemoteFile {
                url: format!("{base}{n}"),
                name: n.to_string(),
                md5: m.into(),
                extract: vec![],
            })
            .collect(),
    }
}

/// The built-in catalogue. Checksums are the ones the publishers list.
pub fn catalogue() -> Vec<DataSet> {
    let cifar_members = (1..=5)
        .map(|i| format!("data_batch_{i}.bin"))
        .chain(["test_batch.bin".to_string(), "batches.meta.txt".to_string()])
        .map(|m| (format!("cifar-10-batches-bin/{m}"), m))
        .collect();
    vec![
        idx_set(
            "mnist",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "Yann LeCun and Corinna Cortes; usually credited CC BY-SA 3.0",
            [
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            ],
        ),
        idx_set(
            "fashion-mnist",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "MIT, Zalando SE",
            [
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ],
        ),
        DataSet {
            name: "cifar10".into(),
            licence: "Alex Krizhevsky, 2009; see https://www.cs.toronto.edu/~kriz/cifar.html"
                .into(),
            files: vec![RemoteFile {
                url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz".into(),
                name: "cifar-10-binary.tar.gz".into(),
                md5: "c32a1d4ab5d03f1284b67883e8d87530".into(),
                extract: cifar_members,
            }],
        },
    ]
}

/// What happened to one file.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    AlreadyThere,
    Downloaded { bytes: u64, resumed_from: u64 },
}

fn md5_of(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut h = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Downloads one file into `dest`, resuming a `.part` file left by an earlier try.
pub fn fetch_file(
    file: &RemoteFile,
    dest: &Path,
    on_bytes: &mut dyn FnMut(u64, Option<u64>),
) -> Result<Fetched> {
    let final_path = dest.join(&file.name);
    if final_path.exists() && md5_of(&final_path)? == file.md5 {
        return Ok(Fetched::AlreadyThere);
    }
    std::fs::create_dir_all(dest)
        .map_err(|e| Error::io(format!("creating {}", dest.display()), e))?;
    let part = dest.join(format!(".{}.part", file.name));
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(std::time::Duration::from_secs(20)))
        .build()
        .into();
    let mut req = agent.get(&file.url);
    if have > 0 {
        req = req.header("Range", format!("bytes={have}-"));
    }
    let mut resp = req.call().map_err(|e| {
        Error::Params(format!(
            "downloading {}: {e}; check the network or pass --mirror",
            file.url
        ))
    })?;
    let status = resp.status().as_u16();
    let (append, start) = match status {
        206 if have > 0 => (true, have),
        200 => (false, 0),
        416 if have > 0 => (true, have), // nothing left to fetch
        _ => {
            return Err(Error::Params(format!(
                "downloading {}: the server answered HTTP {status}",
                file.url
            )));
        }
    };
    let total = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| n + start);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&part)
        .map_err(|e| Error::io(format!("opening {}", part.display()), e))?;
    let mut got = start;
    if status != 416 {
        let mut body = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = body.read(&mut buf).map_err(|e| {
                Error::io(
                    format!(
                        "downloading {} (stopped at {got} bytes; run the same command again to resume)",
                        file.url
                    ),
                    e,
                )
            })?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])
                .map_err(|e| Error::io(format!("writing {}", part.display()), e))?;
            got += n as u64;
            on_bytes(got, total);
        }
    }
    out.sync_all()
        .map_err(|e| Error::io(format!("writing {}", part.display()), e))?;
    drop(out);
    if let Some(t) = total
        && got < t
    {
        return Err(Error::Params(format!(
            "downloading {}: the connection ended at {got} of {t} bytes; run the same command again to resume",
            file.url
        )));
    }
    let sum = md5_of(&part)?;
    if sum != file.md5 {
        let _ = std::fs::remove_file(&part);
        return Err(Error::data(
            &final_path,
            None,
            format!(
                "checksum mismatch: MD5 {sum}, want {}; the download was discarded, run again (or check --mirror)",
                file.md5
            ),
        ));
    }
    std::fs::rename(&part, &final_path)
        .map_err(|e| Error::io(format!("moving {} into place", part.display()), e))?;
    Ok(Fetched::Downloaded {
        bytes: got,
        resumed_from: start,
    })
}

/// Unpacks the listed members of a `.tar.gz`, each by write-then-rename.
pub fn extract(archive: &Path, members: &[(String, String)], dest: &Path) -> Result<Vec<PathBuf>> {
    let f = std::fs::File::open(archive)
        .map_err(|e| Error::io(format!("opening {}", archive.display()), e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)));
    let mut written = Vec::new();
    let entries = tar
        .entries()
        .map_err(|e| Error::data(archive, None, format!("not a tar.gz archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| Error::data(archive, None, format!("damaged archive: {e}")))?;
        let name = entry
            .path()
            .map_err(|e| Error::data(archive, None, format!("damaged archive: {e}")))?
            .to_string_lossy()
            .to_string();
        // Only the listed members, to the listed names: nothing else is written.
        let Some((_, out_name)) = members.iter().find(|(m, _)| *m == name) else {
            continue;
        };
        let target = dest.join(out_name);
        let tmp = dest.join(format!(".{out_name}.part"));
        let mut out = std::fs::File::create(&tmp)
            .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
        std::io::copy(&mut entry, &mut out)
            .map_err(|e| Error::io(format!("unpacking {name}"), e))?;
        out.sync_all()
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &target)
            .map_err(|e| Error::io(format!("moving {}", tmp.display()), e))?;
        written.push(target);
    }
    if written.len() != members.len() {
        return Err(Error::data(
            archive,
            None,
            format!(
                "holds {} of the {} expected members",
                written.len(),
                members.len()
            ),
        ));
    }
    Ok(written)
}

/// Fetches a whole data set into `dest`; `mirror` replaces each URL's folder.
pub fn fetch(
    set: &DataSet,
    dest: &Path,
    mirror: Option<&str>,
    report: &mut dyn FnMut(&str),
) -> Result<()> {
    for f in &set.files {
        let mut file = f.clone();
        if let Some(m) = mirror {
            file.url = format!("{}/{}", m.trim_end_matches('/'), f.name);
        }
        let r = fetch_file(&file, dest, &mut |_, _| {})?;
        match r {
            Fetched::AlreadyThere => report(&format!("{}: already there, checksum ok", f.name)),
            Fetched::Downloaded {
                bytes,
                resumed_from,
            } => report(&format!(
                "{}: {bytes} bytes{}, checksum ok",
                f.name,
                if resumed_from > 0 {
                    format!(" (resumed at {resumed_from})")
                } else {
                    String::new()
                }
            )),
        }
        if !f.extract.is_empty() {
            let done = extract(&dest.join(&f.name), &f.extract, dest)?;
            report(&format!("{}: unpacked {} files", f.name, done.len()));
        }
    }
    Ok(())
}

/// A data set by name, from the built-in catalogue or a catalogue file (JSON list of [`DataSet`]).
pub fn find(name: &str, catalogue_file: Option<&Path>) -> Result<DataSet> {
    let sets = match catalogue_file {
        Some(p) => {
            let text =
                std::fs::read(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
            serde_json::from_slice::<Vec<DataSet>>(&text)
                .map_err(|e| Error::data(p, None, format!("not a data set catalogue: {e}")))?
        }
        None => catalogue(),
    };
    let names: Vec<String> = sets.iter().map(|s| s.name.clone()).collect();
    sets.into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| Error::Params(format!("no data set `{name}`; known: {}", names.join(", "))))
}
