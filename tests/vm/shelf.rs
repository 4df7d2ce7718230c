//! The box's one package server: files by name on a loopback port, with Range, ETag/If-Range
//! and an adjustable rate (a download slow enough to cut the power in).

use crate::support::{md5_hex, read_head};
use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Default)]
struct Inner {
    files: HashMap<String, Arc<Vec<u8>>>,
    /// Bytes per second; 0 = as fast as it goes.
    rate: u64,
}

#[derive(Clone)]
pub struct Shelf {
    pub port: u16,
    inner: Arc<Mutex<Inner>>,
}

pub struct Package {
    pub version: String,
    pub name: String,
    pub size: u64,
    pub md5: String,
}

impl Shelf {
    pub fn start() -> Shelf {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let inner = Arc::new(Mutex::new(Inner::default()));
        let i = inner.clone();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let i = i.clone();
                thread::spawn(move || {
                    let _ = serve(conn, &i);
                });
            }
        });
        Shelf { port, inner }
    }

    pub fn put(&self, version: &str, bytes: Vec<u8>) -> Package {
        let name = format!("tope-{version}.zip");
        let p = Package {
            version: version.to_string(),
            name: name.clone(),
            size: bytes.len() as u64,
            md5: md5_hex(&bytes),
        };
        self.inner
            .lock()
            .unwrap()
            .files
            .insert(name, Arc::new(bytes));
        p
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.inner.lock().unwrap().rate = bytes_per_sec;
    }
}

impl Package {
    /// The URL as the guest sees it.
    pub fn url(&self) -> String {
        format!("http://packages.box/{}", self.name)
    }

    /// The API's download body.
    pub fn request(&self) -> String {
        serde_json::json!({
            "version": self.version,
            "package_url": self.url(),
            "package_name": self.name,
            "package_size": self.size,
            "package_md5": self.md5,
        })
        .to_string()
    }

    /// `tope-ota download` with flags.
    pub fn download_cmd(&self) -> String {
        format!(
            "tope-ota download --version {} --url {} --name {} --size {} --md5 {}",
            self.version,
            self.url(),
            self.name,
            self.size,
            self.md5
        )
    }
}

fn serve(conn: TcpStream, inner: &Mutex<Inner>) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let Some((method, path, headers)) = read_head(&mut reader) else {
        return Ok(());
    };
    let (file, rate) = {
        let i = inner.lock().unwrap();
        (i.files.get(path.trim_start_matches('/')).cloned(), i.rate)
    };
    let Some(file) = file else {
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    };
    let total = file.len() as u64;
    let etag = format!("\"{}\"", md5_hex(&file));
    let mut start = 0;
    if let Some(r) = headers.get("range") {
        let from = r
            .strip_prefix("bytes=")
            .and_then(|x| x.strip_suffix('-'))
            .and_then(|x| x.parse::<u64>().ok());
        match from {
            Some(f) if f < total => {
                if headers.get("if-range").is_none_or(|v| *v == etag) {
                    start = f;
                }
            }
            _ => {
                write!(out, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
                return Ok(());
            }
        }
    }
    if start > 0 {
        write!(
            out,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{total}\r\nContent-Length: {}\r\nETag: {etag}\r\nConnection: close\r\n\r\n",
            total - 1,
            total - start
        )?;
    } else {
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: {total}\r\nETag: {etag}\r\nConnection: close\r\n\r\n"
        )?;
    }
    if method == "HEAD" {
        return Ok(());
    }
    let chunk = 16 * 1024;
    let mut pos = start as usize;
    while pos < file.len() {
        let end = (pos + chunk).min(file.len());
        out.write_all(&file[pos..end])?;
        pos = end;
        if let Some(us) = (chunk as u64 * 1_000_000).checked_div(rate) {
            thread::sleep(Duration::from_micros(us));
        }
    }
    out.flush()
}
