//! Questions `posfleet login` asks. At a terminal, secrets are read without
//! echo; when stdin is not a terminal (a script, a test), the answers are
//! read from it, one per line, in the order the questions come, and no
//! question is printed. Secrets never come from the command line, where
//! `ps` would show them.

use anyhow::{Context, bail};
use std::io::{BufRead, IsTerminal, Write};

pub struct Answers {
    /// `None` at a terminal.
    piped: Option<Box<dyn BufRead>>,
}

impl Answers {
    /// Answers from the terminal, or from stdin when it is not one.
    pub fn from_stdin() -> Answers {
        let stdin = std::io::stdin();
        let piped: Option<Box<dyn BufRead>> = if stdin.is_terminal() {
            None
        } else {
            Some(Box::new(std::io::BufReader::new(stdin)))
        };
        Answers { piped }
    }

    /// Answers read from `lines`, as when stdin is not a terminal.
    #[cfg(test)]
    pub fn from_lines(lines: &'static str) -> Answers {
        Answers {
            piped: Some(Box::new(lines.as_bytes())),
        }
    }

    pub fn interactive(&self) -> bool {
        self.piped.is_none()
    }

    /// A secret: not echoed at a terminal.
    pub fn secret(&mut self, question: &str) -> anyhow::Result<String> {
        match &mut self.piped {
            None => rpassword::prompt_password(question)
                .with_context(|| format!("cannot read the answer to `{}`", question.trim())),
            Some(input) => next_line(input.as_mut(), question),
        }
    }

    /// An answer that may be seen (a one-time code).
    pub fn visible(&mut self, question: &str) -> anyhow::Result<String> {
        match &mut self.piped {
            None => {
                let mut stderr = std::io::stderr();
                let _ = write!(stderr, "{question}");
                let _ = stderr.flush();
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .with_context(|| format!("cannot read the answer to `{}`", question.trim()))?;
                Ok(line.trim().to_string())
            }
            Some(input) => next_line(input.as_mut(), question),
        }
    }
}

fn next_line(input: &mut dyn BufRead, question: &str) -> anyhow::Result<String> {
    let mut line = String::new();
    let read = input
        .read_line(&mut line)
        .with_context(|| format!("cannot read the answer to `{}`", question.trim()))?;
    if read == 0 {
        bail!(
            "stdin ended before the answer to `{}` (when stdin is not a terminal, posfleet login reads its answers from it, one per line)",
            question.trim().trim_end_matches(':')
        );
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piped_answers_come_one_per_line_and_running_out_says_which() {
        let mut answers = Answers::from_lines("hunter2 with spaces \r\n123456\n");
        assert!(!answers.interactive());
        assert_eq!(
            answers.secret("Password: ").unwrap(),
            "hunter2 with spaces "
        );
        assert_eq!(answers.visible("Code: ").unwrap(), "123456");
        let error = answers.visible("Code again: ").unwrap_err().to_string();
        assert!(error.contains("`Code again`"), "{error}");
    }
}
